//! The Raft network: openraft's RPCs over tonic on the peer port.
//!
//! Every call has a deadline (openraft's `RPCOption`, or the node's RPC timeout): a hung peer
//! never stalls the leader (openraft #1810). A node never opens a connection to itself
//! (openraft #994). Snapshots are streamed in chunks and reassembled under a size limit.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::errors::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::codec::{decode, encode};
use crate::pb::peer_client::PeerClient;
use crate::pb::{Payload, SnapshotChunk};
use crate::types::{Member, NodeId, Snapshot, TypeConfig, Vote};

/// Largest peer message (an append batch or a snapshot chunk), both directions.
pub const MAX_PEER_MESSAGE: usize = 256 * 1024 * 1024;
/// Snapshot chunk size on the wire.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;

/// A pool of TLS channels to peers, by address. Channels reconnect by themselves.
#[derive(Clone)]
pub struct PeerPool {
    tls: ClientTlsConfig,
    connect_timeout: Duration,
    local_ip: Option<std::net::IpAddr>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool").finish_non_exhaustive()
    }
}

impl PeerPool {
    /// A pool whose channels use `tls` (node certificate and cluster CA). With `local_ip`,
    /// outgoing connections originate from that address (the node's own peer address), so
    /// firewalls and fault injection can tell nodes apart by source address.
    pub fn new(
        tls: ClientTlsConfig,
        connect_timeout: Duration,
        local_ip: Option<std::net::IpAddr>,
    ) -> PeerPool {
        PeerPool {
            tls,
            connect_timeout,
            local_ip,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A client for the peer at `addr` (`host:port`).
    pub fn client(&self, addr: &str) -> Result<PeerClient<Channel>, String> {
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| "peer pool lock poisoned".to_string())?;
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("https://{addr}"))
                    .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
                    .tls_config(self.tls.clone())
                    .map_err(|e| format!("peer TLS config: {e}"))?
                    .connect_timeout(self.connect_timeout)
                    .local_address(self.local_ip)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5));
                let channel = endpoint.connect_lazy();
                channels.insert(addr.to_string(), channel.clone());
                channel
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE))
    }
}

/// openraft's network factory.
#[derive(Debug, Clone)]
pub struct Network {
    self_id: NodeId,
    pool: PeerPool,
    snapshot_timeout: Duration,
}

impl Network {
    /// The network of node `self_id`.
    pub fn new(self_id: NodeId, pool: PeerPool, snapshot_timeout: Duration) -> Network {
        Network {
            self_id,
            pool,
            snapshot_timeout,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerConnection {
        let client = if target == self.self_id {
            Err(format!(
                "node {target} refuses to open a connection to itself"
            ))
        } else {
            self.pool.client(&node.peer_addr)
        };
        PeerConnection {
            self_id: self.self_id,
            target,
            target_incarnation: node.incarnation,
            client,
            snapshot_timeout: self.snapshot_timeout,
        }
    }
}

/// A connection to one peer.
#[derive(Debug)]
pub struct PeerConnection {
    self_id: NodeId,
    target: NodeId,
    target_incarnation: u64,
    client: Result<PeerClient<Channel>, String>,
    snapshot_timeout: Duration,
}

fn status_error(status: &tonic::Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::from_string(status.message().to_string()))
        }
        _ => RPCError::Network(NetworkError::from_string(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}

fn remote_fatal<E: std::fmt::Display>(target: NodeId, e: E) -> RPCError<TypeConfig> {
    // A peer whose Raft stopped is as good as unreachable for replication.
    RPCError::Unreachable(Unreachable::from_string(format!(
        "node {target} reported: {e}"
    )))
}

/// Test builds only (`failpoints` feature): `raft::peer_delay=return(MS)` delays every outgoing
/// Raft RPC of this node by MS milliseconds, inside its deadline, as chaos-mesh's NetworkChaos
/// `delay` would on the pod's egress (netem is not available where the harness runs).
async fn injected_delay() {
    #[cfg(feature = "failpoints")]
    if let Some(Some(ms)) = fail::eval("raft::peer_delay", |arg| {
        arg.and_then(|a| a.trim().parse::<u64>().ok())
    }) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

impl PeerConnection {
    fn client(&self) -> Result<PeerClient<Channel>, RPCError<TypeConfig>> {
        self.client
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))
    }

    async fn unary<Req, Resp, F, Fut>(
        &self,
        action: RPCTypes,
        req: &Req,
        option: &RPCOption,
        call: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(PeerClient<Channel>, Payload) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Payload>, tonic::Status>>,
    {
        let client = self.client()?;
        let data = encode(req).map_err(|s| status_error(&s))?;
        // openraft's deadline is one heartbeat interval, too short for a large batch: allow at
        // least half a second plus the transfer time at a modest 32 MiB/s.
        let ttl = option.hard_ttl().max(Duration::from_millis(500))
            + Duration::from_secs_f64(data.len() as f64 / (32.0 * 1024.0 * 1024.0));
        let payload = Payload {
            data,
            target_id: self.target,
            target_incarnation: self.target_incarnation,
        };
        let call = async move {
            injected_delay().await;
            call(client, payload).await
        };
        let response = tokio::time::timeout(ttl, call)
            .await
            .map_err(|_| {
                RPCError::Timeout(Timeout {
                    action,
                    id: self.self_id,
                    target: self.target,
                    timeout: ttl,
                })
            })?
            .map_err(|s| status_error(&s))?;
        let result: Result<Resp, RaftError<TypeConfig>> =
            decode(&response.into_inner().data).map_err(|s| status_error(&s))?;
        result.map_err(|e| remote_fatal(self.target, e))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(
            RPCTypes::AppendEntries,
            &rpc,
            &option,
            |mut c, p| async move { c.append_entries(p).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RPCTypes::Vote, &rpc, &option, |mut c, p| async move {
            c.vote(p).await
        })
        .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RPCTypes::Vote, &rpc, &option, |mut c, p| async move {
            c.pre_vote(p).await
        })
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client()?;
        let vote_bytes = encode(&vote).map_err(|s| StreamingError::from(status_error(&s)))?;
        let meta_bytes =
            encode(&snapshot.meta).map_err(|s| StreamingError::from(status_error(&s)))?;
        let data = snapshot.snapshot;
        let mut chunks = Vec::with_capacity(data.len() / SNAPSHOT_CHUNK + 1);
        let mut pieces = data.chunks(SNAPSHOT_CHUNK);
        chunks.push(SnapshotChunk {
            vote: vote_bytes,
            meta: meta_bytes,
            data: pieces.next().map(<[u8]>::to_vec).unwrap_or_default(),
            target_id: self.target,
            target_incarnation: self.target_incarnation,
        });
        crate::tap::outgoing(&chunks[0].data);
        for piece in pieces {
            crate::tap::outgoing(piece);
            chunks.push(SnapshotChunk {
                data: piece.to_vec(),
                ..SnapshotChunk::default()
            });
        }
        tracing::info!(
            target_node = self.target,
            bytes = data.len(),
            chunks = chunks.len(),
            "sending snapshot"
        );
        let send = tokio::time::timeout(
            self.snapshot_timeout,
            client.install_snapshot(tokio_stream::iter(chunks)),
        );
        let response = tokio::select! {
            r = send => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let response = response
            .map_err(|_| {
                StreamingError::Timeout(Timeout {
                    action: RPCTypes::InstallSnapshot,
                    id: self.self_id,
                    target: self.target,
                    timeout: self.snapshot_timeout,
                })
            })?
            .map_err(|s| StreamingError::from(status_error(&s)))?;
        let result: Result<SnapshotResponse<TypeConfig>, openraft::errors::Fatal<TypeConfig>> =
            decode(&response.into_inner().data)
                .map_err(|s| StreamingError::from(status_error(&s)))?;
        result.map_err(|e| StreamingError::from(remote_fatal(self.target, e)))
    }
}
