//! Running one node: storage and identity checks, Raft, the API, peer and metrics listeners,
//! bootstrap of a new cluster, and stopping on a fatal storage or Raft error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coffer_raft::{PeerIdentity, PeerPool, PeerRecheck, PeerService, RaftNode};
use coffer_storage::{Backend, Store, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;

use crate::api::Api;
use crate::config::{DataLocation, NodeConfig};
use crate::metrics::{self, Metrics};
use crate::node_identity::{self, NodeRecord, PeerTls};
use crate::seal::Seal;
use crate::tls::TlsMaterial;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "coffer.redb";
const META_NODE_ID: &str = "node_id";
const META_CLUSTER: &str = "cluster_name";
const META_INCARNATION: &str = "incarnation";

/// Largest snapshot a node accepts from a peer.
const MAX_SNAPSHOT_BYTES: u64 = 8 << 30;

/// A running node.
#[derive(Debug)]
pub struct RunningNode {
    /// The Raft node.
    pub node: Arc<RaftNode>,
    /// Bound API address.
    pub api_addr: SocketAddr,
    /// Bound peer address.
    pub peer_addr: SocketAddr,
    /// Bound metrics address.
    pub metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    /// Stops the peer server (after the API drained).
    peer_stop: watch::Sender<bool>,
    /// The API server: it finishes the requests in flight once `stop` turns true.
    api_server: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Set to the reason when the node stopped by itself (fatal error).
    pub fatal: watch::Receiver<Option<String>>,
}

impl RunningNode {
    /// Waits until this node knows a leader, at most `timeout`.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.node.changes();
        loop {
            if let Some(l) = self.node.leader_id() {
                return Ok(l);
            }
            match tokio::time::timeout_at(deadline, changes.next()).await {
                Ok(true) => {}
                Ok(false) => anyhow::bail!("the node stopped"),
                Err(_) => anyhow::bail!("no leader within {timeout:?}"),
            }
        }
    }

    /// Hands leadership over (on a leader, at most 3 s), stops the listeners, lets the API
    /// requests in flight finish (at most 10 s), then stops Raft. Without the wait, a write in flight when SIGTERM came (a rolling restart) was
    /// answered "raft stopped" (INTERNAL) although it was committed; now it gets its answer,
    /// and new calls go to the other nodes.
    pub async fn stop(self) {
        // A leader hands over first (its peer port still serves the election), so a rolling
        // restart costs no election timeout.
        if let Some(to) = self.node.hand_over_leadership(Duration::from_secs(3)).await {
            tracing::info!(to, "handed leadership over before stopping");
        }
        let _ = self.stop.send(true);
        let mut api_server = self.api_server;
        if tokio::time::timeout(Duration::from_secs(10), &mut api_server)
            .await
            .is_err()
        {
            tracing::warn!("API requests still in flight after 10 s; stopping anyway");
            api_server.abort();
        }
        let _ = self.peer_stop.send(true);
        self.node.shutdown().await;
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Opens the store and checks that the data directory belongs to this node and cluster.
/// Returns it with the data directory's incarnation (random, made when it was created).
fn open_store(cfg: &NodeConfig, metrics: &Metrics) -> Result<(Store, u64)> {
    let backend = match &cfg.data {
        DataLocation::Memory => Backend::Memory,
        DataLocation::Dir(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
            Backend::File(dir.join(DB_FILE))
        }
    };
    let mut store_cfg = StoreConfig::new(backend);
    let m = metrics.clone();
    store_cfg.on_flush = Some(Arc::new(move |e| m.observe_flush(e)));
    let store = Store::open(store_cfg).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nThe data directory is corrupt, locked by another process, or not a Coffer database. \
             Coffer never reinitializes it: stop the other process, or move the directory away, \
             remove this member (`coffer cluster remove ID`) and join a new node. A copy of one \
             node's directory from earlier is not a backup (its vote and log would be stale); \
             backups restore a whole cluster (docs/operations/backup-and-restore.md)."
        )
    })?;
    let stored_id = store.meta_get(META_NODE_ID)?;
    let stored_cluster = store.meta_get(META_CLUSTER)?;
    match (stored_id, stored_cluster) {
        (None, None) => {
            let incarnation = loop {
                let i: u64 = rand::random();
                if i != 0 {
                    break i;
                }
            };
            store.meta_put(META_INCARNATION, &incarnation.to_le_bytes(), true)?;
            store.meta_put(META_NODE_ID, &cfg.node_id.to_le_bytes(), true)?;
            store.meta_put(META_CLUSTER, cfg.cluster_name.as_bytes(), true)?;
        }
        (Some(id), Some(cluster)) => {
            let id = <[u8; 8]>::try_from(id.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| anyhow::anyhow!("the data directory's node id record is corrupt"))?;
            let cluster = String::from_utf8_lossy(&cluster).into_owned();
            if id != cfg.node_id {
                bail!(
                    "the data directory belongs to node {id}, but this node is configured as node {}; \
                     start it with --node-id {id} or give it its own --data-dir",
                    cfg.node_id
                );
            }
            if cluster != cfg.cluster_name {
                bail!(
                    "the data directory belongs to cluster {cluster:?}, but this node is configured for \
                     cluster {:?}; fix --cluster-name or give it its own --data-dir",
                    cfg.cluster_name
                );
            }
        }
        _ => {
            bail!(
                "the data directory's identity records are incomplete: move it away, remove this member (`coffer cluster remove ID`) and join a new node"
            )
        }
    }
    let incarnation = store
        .meta_get(META_INCARNATION)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_le_bytes)
        .context("the data directory's incarnation record is missing: move it away, remove this member (`coffer cluster remove ID`) and join a new node")?;
    Ok((store, incarnation))
}

/// Connections once their TLS handshake is done. Each handshake runs in its own task (at
/// most 10 s), so a slow client holds up no other; the accept loop ends with the server.
fn tls_incoming(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    name: &'static str,
) -> (
    tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let (conn, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, listener = name, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = conn.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(conn)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, listener = name, "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%peer, listener = name, "TLS handshake timed out"),
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

/// Serves a gRPC router on a TLS listener until `stop` turns true: the accept loop's task and
/// the server's.
fn serve(
    name: &'static str,
    router: tonic::transport::server::Router,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) -> [tokio::task::JoinHandle<()>; 2] {
    let (incoming, accept) = tls_incoming(listener, acceptor, name);
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!(error = %e, listener = name, "server stopped");
        }
    });
    [accept, server]
}

/// What an initial member needs to join the cluster its peers formed without it.
struct Rejoin {
    tls: Arc<PeerTls>,
    node_key: Arc<crate::keys::KeyPair>,
    me: coffer_raft::Member,
    token_file: Option<std::path::PathBuf>,
    /// The bootstrapping task, if this node is the bootstrapper: it stops before the join (a
    /// joined node's peers would answer its "are you initialized?" and it would stop itself).
    bootstrapping: Option<tokio::task::AbortHandle>,
}

/// Until this node's log has a membership, asks the other initial members (every second,
/// through their API) whether the cluster knows this node with another data directory
/// incarnation; if one does, this node's data directory was replaced and it stops serving (as
/// when a peer addresses it with the old incarnation). If the cluster they formed does not
/// list this node at all (an operator removed it after its data was lost), a pod (with a join
/// token) joins it again under its id; any other node is told to join under a new id.
async fn stop_if_replaced(node: Arc<RaftNode>, others: crate::client::Target, rejoin: Rejoin) {
    use coffer_api::v1::cluster_client::ClusterClient;
    let mut told = false;
    loop {
        if node.is_initialized().await.unwrap_or(true) {
            return;
        }
        for addr in &others.addrs {
            let Ok(channel) = others.channel_to(addr) else {
                continue;
            };
            let Ok(status) = ClusterClient::new(channel)
                .status(coffer_api::v1::StatusRequest { digest: false })
                .await
            else {
                continue;
            };
            let members = status.into_inner().members;
            let known = members
                .iter()
                .find(|m| m.id == node.id())
                .map(|m| m.incarnation);
            match known {
                Some(known) if known != 0 && known != node.incarnation() => {
                    node.refuse_stale_incarnation(known).await;
                    return;
                }
                Some(_) => {}
                None if members.is_empty() => {}
                None if rejoin.token_file.is_some() => {
                    tracing::info!(
                        via = addr,
                        "the cluster the initial members formed no longer lists this node (it was removed): joining it again"
                    );
                    if let Some(task) = &rejoin.bootstrapping {
                        task.abort();
                    }
                    // A join waits until the node is added: longer than a status call.
                    let through = crate::client::Target {
                        timeout: Duration::from_secs(30),
                        ..others.clone()
                    };
                    node_identity::join(
                        rejoin.tls.clone(),
                        node.clone(),
                        rejoin.node_key.clone(),
                        through,
                        rejoin.me.clone(),
                        rejoin.token_file.clone(),
                    )
                    .await;
                    return;
                }
                None => {
                    if !told {
                        tracing::warn!(
                            via = addr,
                            "the cluster the initial members formed does not list this node (it was removed): a removed id is never given to a registered node key again; join this machine under a new id (--join, --node-key)"
                        );
                        told = true;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Starts a node: binds its listeners, starts Raft, bootstraps a new cluster if configured.
pub async fn start(cfg: NodeConfig, tls: TlsMaterial) -> Result<RunningNode> {
    let metrics = Metrics::new(cfg.node_id)?;
    let (store, incarnation) = open_store(&cfg, &metrics)?;
    // Outgoing peer connections leave from the peer listener's address when it is a specific
    // one (not 0.0.0.0 / ::), so each node's traffic carries its own source address.
    let local_ip = Some(cfg.peer_addr.ip()).filter(|ip| !ip.is_unspecified());
    let identity_dir = match &cfg.data {
        DataLocation::Dir(dir) => Some(dir.join("node-tls")),
        DataLocation::Memory => None,
    };
    let node_key = Arc::new(node_identity::load_node_key(
        cfg.node_key.as_deref(),
        identity_dir.as_deref(),
    )?);
    let peer_tls = PeerTls::new(
        cfg.node_id,
        tls.certified_key().context("the TLS files")?,
        tls.ca_pem(),
        node_key.clone(),
        identity_dir,
        cfg.initial_members.keys().copied().collect(),
    )?;
    let pool = PeerPool::new(peer_tls.client_config()?, Duration::from_secs(2), local_ip);
    let node = RaftNode::start(cfg.node_id, incarnation, cfg.raft.clone(), store, pool).await?;
    // A restarted node knows the node CA and the recorded nodes from its state.
    peer_tls.refresh(&node)?;

    let api_listener = TcpListener::bind(cfg.api_addr)
        .await
        .with_context(|| format!("cannot listen for the API on {}", cfg.api_addr))?;
    let peer_listener = TcpListener::bind(cfg.peer_addr)
        .await
        .with_context(|| format!("cannot listen for peers on {}", cfg.peer_addr))?;
    let api_addr = api_listener.local_addr()?;
    let peer_addr = peer_listener.local_addr()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    // The peer port stops after the API's calls in flight finished: they may still need
    // entries from the new leader.
    let (peer_stop_tx, peer_stop_rx) = watch::channel(false);
    let (fatal_tx, fatal_rx) = watch::channel(None);
    let mut tasks = Vec::new();

    // Every node starts sealed; unseal shares relayed by other members reach it over the peer
    // channel.
    let seal = Seal::new(node.clone(), cfg.unseal_progress_ttl);
    node.set_app_handler(seal.app_handler());
    tasks.push(tokio::spawn(
        seal.clone().peer_unseal_loop(Duration::from_millis(250)),
    ));
    // Operators' seal and rotate actions reach this node through what it applies.
    tasks.push(tokio::spawn(seal.clone().watch()));
    tasks.push(tokio::spawn(node_identity::maintain(
        peer_tls.clone(),
        node.clone(),
        seal.clone(),
        NodeRecord {
            api_addr: cfg.member.api_addr.clone(),
            peer_addr: cfg.member.peer_addr.clone(),
            recorded_ms: 0,
            how: "initial member, at its first unseal".into(),
            signing_key: node_key.public().signing_key(),
        },
    )));
    let rejoin_key = node_key.clone();
    if !cfg.join.is_empty() {
        tasks.push(tokio::spawn(node_identity::join(
            peer_tls.clone(),
            node.clone(),
            node_key,
            crate::client::Target {
                addrs: cfg.join.clone(),
                ca_pem: tls.ca_pem().to_vec(),
                timeout: Duration::from_secs(30),
                session: None,
            },
            cfg.member.clone(),
            cfg.join_token_file.clone(),
        )));
    }
    let ready_seal = seal.clone();
    let api = Api::new(
        node.clone(),
        metrics.clone(),
        cfg.max_value_bytes,
        cfg.cluster_name.clone(),
        seal,
        cfg.login,
        Arc::new(
            crate::kubernetes::Validator::new(cfg.kubernetes.clone())
                .context("Kubernetes login")?,
        ),
    )
    .with_raw_storage_endpoint(cfg.raw_storage_endpoint)
    .with_autopilot(cfg.autopilot);
    tasks.push(tokio::spawn(api.clone().clean_up_logins_loop()));
    tasks.push(tokio::spawn(api.clone().clean_up_wraps_loop()));
    tasks.push(tokio::spawn(api.clone().autopilot_loop()));
    if let Some(schedule) = cfg.backups.clone() {
        tasks.push(tokio::spawn(crate::backup::run_schedule(
            node.clone(),
            schedule,
        )));
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(coffer_api::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection")?;
    // A request carries at most one value (plus framing); a response at most a list page.
    let max_message = (cfg.max_value_bytes + (1 << 20)).max(crate::api::MAX_PAGE_BYTES * 2);
    let api_server = Server::builder()
        .concurrency_limit_per_connection(1024)
        .add_service(reflection)
        .add_service(
            coffer_api::v1::kv_server::KvServer::new(api.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(coffer_api::v1::cluster_server::ClusterServer::new(
            api.clone(),
        ))
        .add_service(coffer_api::v1::seal_server::SealServer::new(api.clone()))
        .add_service(coffer_api::v1::policies_server::PoliciesServer::new(
            api.clone(),
        ))
        .add_service(coffer_api::v1::identities_server::IdentitiesServer::new(
            api.clone(),
        ))
        .add_service(coffer_api::v1::sessions_server::SessionsServer::new(
            api.clone(),
        ))
        .add_service(coffer_api::v1::settings_server::SettingsServer::new(
            api.clone(),
        ))
        .add_service(
            coffer_api::v1::kubernetes_roles_server::KubernetesRolesServer::new(api.clone()),
        )
        .add_service(coffer_api::v1::grants_server::GrantsServer::new(
            api.clone(),
        ))
        .add_service(
            coffer_api::kv::v1::kv_server::KvServer::new(api.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(coffer_api::kv::v1::mounts_server::MountsServer::new(
            api.clone(),
        ))
        .add_service(
            coffer_api::wrap::v1::wrap_server::WrapServer::new(api.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(coffer_api::v1::auth_server::AuthServer::new(api));
    let [api_accept, api_server] = serve(
        "API",
        api_server,
        api_listener,
        tls.api_acceptor().context("API TLS")?,
        stop_rx.clone(),
    );
    tasks.push(api_accept);

    // Every peer request is checked again (the handshake checked the certificate once): a
    // connection made before a member's bootstrap certificate stopped counting, or by a node
    // since removed, gets no further.
    let checker = peer_tls.clone();
    let peer_service = tonic::service::interceptor::InterceptedService::new(
        PeerService::server(node.clone(), MAX_SNAPSHOT_BYTES),
        move |mut req: tonic::Request<()>| {
            let certs = req.peer_certs();
            let check = {
                let checker = checker.clone();
                move || checker.check_request(certs.as_deref().map(Vec::as_slice))
            };
            let id = check().map_err(|why| {
                tonic::Status::unauthenticated(format!("peer certificate refused: {why}"))
            })?;
            req.extensions_mut().insert(PeerIdentity(id));
            // The same check, for long-lived streams, which repeat it as they go.
            req.extensions_mut()
                .insert(PeerRecheck(Arc::new(move || check().map(|_| ()))));
            Ok(req)
        },
    );
    tasks.extend(serve(
        "peer",
        // Keep-alives end a replication stream whose leader vanished without closing it.
        Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(peer_service),
        peer_listener,
        tokio_rustls::TlsAcceptor::from(peer_tls.server_config()?),
        peer_stop_rx,
    ));

    let metrics_addr = match cfg.metrics_addr {
        Some(addr) => {
            let (bound, task) =
                metrics::serve(addr, metrics.clone(), node.clone(), ready_seal).await?;
            tasks.push(task);
            Some(bound)
        }
        None => None,
    };

    // A node whose storage or Raft failed stops serving at once: it must never go on with a
    // state it did not persist.
    let watched = node.clone();
    let stop_on_fatal = stop_tx.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            if let Some(why) = watched.fatal() {
                tracing::error!(reason = %why, "node stopped serving");
                let _ = fatal_tx.send(Some(why));
                let _ = stop_on_fatal.send(true);
                return;
            }
            watched.wait_changed(Duration::from_millis(500)).await;
        }
    }));

    if cfg.initial_members.contains_key(&cfg.node_id) && !node.is_initialized().await? {
        // A member whose data directory was replaced cannot be told so over the peer port
        // (it presents its bootstrap certificate, which its peers no longer accept once it has
        // a node certificate): it asks the other members' API who the cluster knows instead.
        let others: Vec<String> = cfg
            .initial_members
            .iter()
            .filter(|(id, _)| **id != cfg.node_id)
            .map(|(_, m)| m.api_addr.clone())
            .collect();
        let first = cfg.initial_members.keys().next().copied();
        let mut bootstrapping = None;
        if first == Some(cfg.node_id) {
            // The other members may start later: wait for them in the background.
            let (bootstrapper, members) = (node.clone(), cfg.initial_members.clone());
            let task = tokio::spawn(async move {
                match bootstrapper.bootstrap(members).await {
                    Ok(created) => tracing::info!(created, "bootstrapped a new cluster"),
                    Err(e) => tracing::error!(error = %e, "cannot bootstrap the cluster"),
                }
            });
            bootstrapping = Some(task.abort_handle());
            tasks.push(task);
        } else {
            tracing::info!(bootstrapper = ?first, "waiting for the bootstrapping member to contact this node");
        }
        if !others.is_empty() {
            tasks.push(tokio::spawn(stop_if_replaced(
                node.clone(),
                crate::client::Target {
                    addrs: others,
                    ca_pem: tls.ca_pem().to_vec(),
                    timeout: Duration::from_secs(3),
                    session: None,
                },
                Rejoin {
                    tls: peer_tls.clone(),
                    node_key: rejoin_key,
                    me: cfg.member.clone(),
                    token_file: cfg.join_token_file.clone(),
                    bootstrapping,
                },
            )));
        }
    }
    tracing::info!(node_id = cfg.node_id, %api_addr, %peer_addr, "node started");
    Ok(RunningNode {
        node,
        api_addr,
        peer_addr,
        metrics_addr,
        stop: stop_tx,
        peer_stop: peer_stop_tx,
        api_server,
        tasks,
        fatal: fatal_rx,
    })
}
