//! openraft's storage conformance suite, run against both storage backends: the log and the
//! state machine keep every promise openraft relies on (ordering, truncation, purge, vote,
//! snapshots) whether the database is a file or lives in memory.

use coffer_raft::{LogStore, StateMachine, TypeConfig};
use coffer_storage::{Backend, Store, StoreConfig};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct FileBuilder;
struct MemoryBuilder;

fn must_open(backend: Backend) -> Store {
    Store::open(StoreConfig::new(backend)).expect("open store")
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, Option<tempfile::TempDir>> for FileBuilder {
    async fn build(
        &self,
    ) -> Result<(Option<tempfile::TempDir>, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = must_open(Backend::File(dir.path().join("node.redb")));
        Ok((
            Some(dir),
            LogStore::new(store.clone()),
            StateMachine::new(store),
        ))
    }
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, Option<tempfile::TempDir>> for MemoryBuilder {
    async fn build(
        &self,
    ) -> Result<(Option<tempfile::TempDir>, LogStore, StateMachine), StorageError<TypeConfig>> {
        let store = must_open(Backend::Memory);
        Ok((None, LogStore::new(store.clone()), StateMachine::new(store)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_passes_the_openraft_storage_suite() {
    Suite::test_all(FileBuilder).await.expect("suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_passes_the_openraft_storage_suite() {
    Suite::test_all(MemoryBuilder).await.expect("suite");
}
