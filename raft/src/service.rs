//! The peer gRPC service: the receiving side of the Raft network, forwarding, read-index and
//! membership changes. Serve it only behind mutual TLS with node certificates.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use coffer_storage::{Command, OpResult};
use futures::Stream;
use openraft::raft::AppendEntriesRequest;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::codec::{decode, encode};
use crate::network::MAX_PEER_MESSAGE;
use crate::node::{Attempt, MembershipChange, PeerRecheck, RaftNode, Written};
use crate::pb::peer_server::{Peer, PeerServer};
use crate::pb::{Payload, SnapshotChunk};
use crate::types::{Snapshot, SnapshotData, SnapshotMeta, TypeConfig, Vote};

/// The peer service of one node.
#[derive(Debug, Clone)]
pub struct PeerService {
    node: Arc<RaftNode>,
    max_snapshot_bytes: u64,
}

impl PeerService {
    /// The tonic server for `node`, with peer message limits set.
    pub fn server(node: Arc<RaftNode>, max_snapshot_bytes: u64) -> PeerServer<PeerService> {
        PeerServer::new(PeerService {
            node,
            max_snapshot_bytes,
        })
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE)
    }
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<Payload>, Status> {
    Ok(Response::new(Payload {
        data: encode(v)?,
        ..Payload::default()
    }))
}

/// The most bytes of previous values a `ForwardBatch` reply carries (beyond its first answer).
const FORWARD_REPLY_BYTES: usize = MAX_PEER_MESSAGE / 4;

/// About how many bytes an answer to a forwarded write takes on the wire.
fn answer_bytes(outcome: &Result<Written, Attempt>) -> usize {
    let Ok(written) = outcome else { return 256 };
    let prev = written.result.results.iter().map(|r| match r {
        OpResult::Put { prev } | OpResult::Delete { prev } => {
            prev.as_ref().map_or(0, |e| e.key.len() + e.value.len())
        }
        OpResult::DeletePrefix { .. } => 0,
    });
    64 + prev.map(|n| n + 32).sum::<usize>()
}

/// Keeps a `ForwardBatch` reply under the message limit: the answers carry previous values,
/// and past `budget` bytes (after the first answer) an answer is replaced by "retry, possibly
/// applied". The follower retries that write with its request id, and the leader answers with
/// the remembered result, whose values are left out.
fn trim_answers(outcomes: &mut [Result<Written, Attempt>], budget: usize) {
    let mut bytes = 0;
    for (i, outcome) in outcomes.iter_mut().enumerate() {
        bytes += answer_bytes(outcome);
        if i > 0 && bytes > budget {
            *outcome = Err(Attempt::Retry {
                attempted: true,
                why: "its answer did not fit in the batch's reply".into(),
            });
        }
    }
}

/// A deadline the caller sent, capped so a bad peer cannot park a task for long.
fn deadline(millis: u64) -> Instant {
    Instant::now() + Duration::from_millis(millis.min(60_000))
}

impl PeerService {
    /// Refuses a Raft message meant for another node or another incarnation of this node.
    async fn check_target(&self, target_id: u64, target_incarnation: u64) -> Result<(), Status> {
        if target_id != 0 && target_id != self.node.id() {
            return Err(Status::failed_precondition(format!(
                "this is node {}, not node {target_id}: check the cluster's addresses",
                self.node.id()
            )));
        }
        if target_incarnation != 0 && target_incarnation != self.node.incarnation() {
            self.node.refuse_stale_incarnation(target_incarnation).await;
            return Err(Status::failed_precondition(format!(
                "node {} has a new data directory (incarnation {:x}, the cluster knows {:x}); \
                 it must not rejoin under its old id: remove it and add it with a new id",
                self.node.id(),
                self.node.incarnation(),
                target_incarnation
            )));
        }
        Ok(())
    }

    /// A Raft message meant for this node, decoded.
    async fn raft_message<T: serde::de::DeserializeOwned>(&self, p: Payload) -> Result<T, Status> {
        self.check_target(p.target_id, p.target_incarnation).await?;
        decode(&p.data)
    }
}

/// What one `StreamAppend` stream reads its requests with.
struct AppendRequests {
    service: PeerService,
    messages: Streaming<Payload>,
    /// The peer's certificate check, repeated once [`RECHECK_EVERY`] passed since the last.
    recheck: Option<PeerRecheck>,
    checked: Instant,
    /// Whether this stream was counted as one that brought entries.
    counted: bool,
}

impl AppendRequests {
    /// The next request; `None` at the end of the stream.
    async fn next(&mut self) -> Result<Option<AppendEntriesRequest<TypeConfig>>, Status> {
        let Some(p) = self.messages.message().await? else {
            return Ok(None);
        };
        if let Some(PeerRecheck(check)) = &self.recheck
            && self.checked.elapsed() >= RECHECK_EVERY
        {
            self.checked = Instant::now();
            check().map_err(|why| {
                Status::unauthenticated(format!("peer certificate refused: {why}"))
            })?;
        }
        let rpc: AppendEntriesRequest<TypeConfig> = self.service.raft_message(p).await?;
        if !rpc.entries.is_empty() {
            let counts = &self.service.node.share_counts;
            counts.append_messages.fetch_add(1, Ordering::Relaxed);
            if !self.counted {
                counts.append_streams.fetch_add(1, Ordering::Relaxed);
                self.counted = true;
            }
        }
        Ok(Some(rpc))
    }

    /// As a stream of requests. A message that cannot be taken (for another node or
    /// incarnation, malformed, or from a peer whose certificate no longer counts) ends it, and
    /// `failure` says why.
    fn into_stream(
        self,
        failure: Arc<std::sync::Mutex<Option<Status>>>,
    ) -> impl Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + 'static {
        futures::stream::unfold(self, move |mut requests| {
            let failure = failure.clone();
            async move {
                match requests.next().await {
                    Ok(rpc) => Some((rpc?, requests)),
                    Err(s) => {
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                        None
                    }
                }
            }
        })
    }
}

/// How often a `StreamAppend` stream checks the peer's certificate again.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// The answers of a `StreamAppend` stream.
type AppendAnswers = Pin<Box<dyn Stream<Item = Result<Payload, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = self.raft_message(req.into_inner()).await?;
        reply(&self.node.raft().append_entries(rpc).await)
    }

    type StreamAppendStream = AppendAnswers;

    /// Each request goes to openraft's `stream_append` as it arrives, and each answer (or the
    /// Raft's fatal error) goes back as one message, in order. A request that cannot be taken
    /// ends the stream with its error after the answers to the earlier ones.
    async fn stream_append(
        &self,
        req: Request<Streaming<Payload>>,
    ) -> Result<Response<AppendAnswers>, Status> {
        let failure = Arc::new(std::sync::Mutex::new(None));
        let recheck = req.extensions().get::<PeerRecheck>().cloned();
        let requests = AppendRequests {
            service: self.clone(),
            messages: req.into_inner(),
            recheck,
            checked: Instant::now(),
            counted: false,
        }
        .into_stream(failure.clone());
        let answers = self.node.raft().stream_append(requests).map(|answer| {
            encode(&answer).map(|data| Payload {
                data,
                ..Payload::default()
            })
        });
        let refusal = futures::stream::once(async move {
            failure.lock().unwrap_or_else(|p| p.into_inner()).take()
        })
        .filter_map(|f| f.map(Err));
        Ok(Response::new(Box::pin(answers.chain(refusal))))
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = self.raft_message(req.into_inner()).await?;
        reply(&self.node.raft().vote(rpc).await)
    }

    async fn pre_vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = self.raft_message(req.into_inner()).await?;
        reply(&self.node.raft().pre_vote(rpc).await)
    }

    async fn info(&self, _req: Request<Payload>) -> Result<Response<Payload>, Status> {
        reply(&self.node.info().await)
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Payload>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        self.check_target(first.target_id, first.target_incarnation)
            .await?;
        let vote: Vote = decode(&first.vote)?;
        let meta: SnapshotMeta = decode(&first.meta)?;
        let too_big = |len: usize| {
            Status::resource_exhausted(format!(
                "snapshot of more than {len} bytes is over the limit of {} bytes",
                self.max_snapshot_bytes
            ))
        };
        let mut data = first.data;
        if data.len() as u64 > self.max_snapshot_bytes {
            return Err(too_big(data.len()));
        }
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let len = data.len() + chunk.data.len();
            if len as u64 > self.max_snapshot_bytes {
                return Err(too_big(len));
            }
            data.extend_from_slice(&chunk.data);
        }
        let snapshot = Snapshot {
            meta,
            snapshot: SnapshotData::Image(data),
        };
        reply(&self.node.raft().install_full_snapshot(vote, snapshot).await)
    }

    async fn forward(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let (cmd, millis): (Command, u64) = decode(&req.into_inner().data)?;
        let result = if self.node.raft().is_leader() {
            self.node.propose(&cmd, deadline(millis)).await
        } else {
            Err(Attempt::Retry {
                attempted: false,
                why: format!("node {} is not the leader", self.node.id()),
            })
        };
        reply(&result)
    }

    async fn forward_batch(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let batch: Vec<(Command, u64)> = decode(&req.into_inner().data)?;
        if !self.node.raft().is_leader() {
            return reply(&Err::<Vec<Result<Written, Attempt>>, _>(Attempt::Retry {
                attempted: false,
                why: format!("node {} is not the leader", self.node.id()),
            }));
        }
        // Proposed together: openraft appends them as one batch (one fsync, one append
        // message to each follower).
        let mut outcomes = futures::future::join_all(
            batch
                .iter()
                .map(|(cmd, millis)| self.node.propose(cmd, deadline(*millis))),
        )
        .await;
        trim_answers(&mut outcomes, FORWARD_REPLY_BYTES);
        reply(&Ok::<_, Attempt>(outcomes))
    }

    async fn read_index(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let millis: u64 = decode(&req.into_inner().data)?;
        reply(&self.node.read_index_local(deadline(millis)).await)
    }

    async fn app(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let Some(handler) = self.node.app_handler() else {
            return Err(Status::unavailable("this node is still starting"));
        };
        let peer = req
            .extensions()
            .get::<crate::node::PeerIdentity>()
            .map(|p| p.0);
        match handler(peer, req.into_inner().data).await {
            Ok(data) => Ok(Response::new(Payload {
                data: {
                    crate::tap::outgoing(&data);
                    data
                },
                ..Payload::default()
            })),
            Err(why) => Err(Status::failed_precondition(why)),
        }
    }

    async fn admin(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let (change, millis): (MembershipChange, u64) = decode(&req.into_inner().data)?;
        reply(
            &self
                .node
                .change_membership_local(change, deadline(millis))
                .await,
        )
    }
}

#[cfg(test)]
mod tests {
    use coffer_storage::{KvEntry, TxnResult};

    use super::*;

    fn overwrote(value_len: usize) -> Result<Written, Attempt> {
        Ok(Written {
            result: TxnResult {
                succeeded: true,
                revision: 2,
                results: vec![OpResult::Put {
                    prev: Some(KvEntry {
                        key: b"k".to_vec(),
                        value: vec![7; value_len],
                        version: 1,
                        create_revision: 1,
                        mod_revision: 1,
                    }),
                }],
            },
            index: 9,
        })
    }

    #[test]
    fn a_batch_reply_keeps_the_answers_that_fit_and_the_first_always() {
        let mut outcomes = vec![
            overwrote(5000),
            overwrote(10),
            overwrote(3000),
            overwrote(10),
        ];
        trim_answers(&mut outcomes, 4000);
        let kept: Vec<bool> = outcomes.iter().map(|o| o.is_ok()).collect();
        // The first answer alone is over the budget: it stays, and every later one is cut.
        assert_eq!(kept, vec![true, false, false, false]);
        assert!(matches!(
            outcomes[1],
            Err(Attempt::Retry {
                attempted: true,
                ..
            })
        ));
        let mut outcomes = vec![
            overwrote(100),
            overwrote(100),
            overwrote(5000),
            overwrote(10),
        ];
        trim_answers(&mut outcomes, 4000);
        let kept: Vec<bool> = outcomes.iter().map(|o| o.is_ok()).collect();
        assert_eq!(kept, vec![true, true, false, false]);
    }
}
