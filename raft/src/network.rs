//! The Raft network: openraft's RPCs over tonic on the peer port.
//!
//! Every call has a deadline (openraft's `RPCOption`, or the node's RPC timeout): a hung peer
//! never stalls the leader (openraft #1810). A node never opens a connection to itself
//! (openraft #994). Snapshots are streamed in chunks and reassembled under a size limit.
//!
//! Replication to a follower runs on one long-lived gRPC stream per replication session
//! (`StreamAppend`, openraft's `stream_append`): each AppendEntries request is one message on
//! it, answered in order, with [`STREAM_DEPTH`] in flight, instead of one HTTP/2 stream per
//! call. A peer of a previous build answers UNIMPLEMENTED, and gets AppendEntries calls.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{
    Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::codec::{decode, encode};
use crate::pb::peer_client::PeerClient;
use crate::pb::{Payload, SnapshotChunk};
use crate::types::{Member, NodeId, Snapshot, SnapshotData, TypeConfig, Vote};

/// Largest peer message (an append batch or a snapshot chunk), both directions.
pub const MAX_PEER_MESSAGE: usize = 256 * 1024 * 1024;
/// Snapshot chunk size on the wire.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;
/// AppendEntries requests a replication stream keeps in flight. Two let the leader send the
/// next entries while the follower writes the previous ones; more would only split the entries
/// that gather during a round trip into more, smaller messages.
const STREAM_DEPTH: usize = 2;
/// After a peer answered UNIMPLEMENTED to `StreamAppend` (a previous build), how long the
/// leader replicates to it with AppendEntries calls before it tries the stream again.
const NO_STREAM_RETRY: Duration = Duration::from_secs(60);

/// A pool of TLS channels to peers, by address. Channels reconnect by themselves.
///
/// The TLS client configuration is the node's: it decides which certificate to present and
/// which peers to trust, and may change its mind (a node that receives its node certificate
/// presents it from then on); [`PeerPool::reset`] drops the open channels so that new ones
/// are made with the current choice.
#[derive(Clone)]
pub struct PeerPool {
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
    local_ip: Option<std::net::IpAddr>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Peers that answered UNIMPLEMENTED to `StreamAppend`, and when.
    no_stream: Arc<Mutex<HashMap<String, Instant>>>,
    /// Bumped by [`PeerPool::reset`]: open replication streams end, so that the next session
    /// connects with the certificate this node presents now.
    resets: Arc<tokio::sync::watch::Sender<u64>>,
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool").finish_non_exhaustive()
    }
}

/// Opens a TCP connection to `addr` (from `local_ip` when given) and runs the TLS handshake,
/// checking the peer's certificate for the host of `addr`.
async fn connect_tls(
    tls: tokio_rustls::TlsConnector,
    addr: String,
    local_ip: Option<std::net::IpAddr>,
    timeout: Duration,
) -> std::io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>
{
    use std::io::{Error, ErrorKind};
    let attempt = async {
        let host = match addr.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => addr.as_str(),
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| Error::new(ErrorKind::InvalidInput, format!("{host:?}: {e}")))?;
        let target = tokio::net::lookup_host(&addr)
            .await?
            .next()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{addr} has no address")))?;
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(ip) = local_ip.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
        }
        socket.set_nodelay(true)?;
        let tcp = socket.connect(target).await?;
        let stream = tls.connect(name, tcp).await?;
        Ok(hyper_util::rt::TokioIo::new(stream))
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        Error::new(
            ErrorKind::TimedOut,
            format!("connecting to {addr} timed out"),
        )
    })?
}

impl PeerPool {
    /// A pool whose channels use the TLS client configuration `tls` (it must offer ALPN
    /// `h2`). With `local_ip`, outgoing connections originate from that address (the node's
    /// own peer address), so firewalls and fault injection can tell nodes apart by source
    /// address.
    pub fn new(
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
        local_ip: Option<std::net::IpAddr>,
    ) -> PeerPool {
        PeerPool {
            tls: tokio_rustls::TlsConnector::from(tls),
            connect_timeout,
            local_ip,
            channels: Arc::new(Mutex::new(HashMap::new())),
            no_stream: Arc::new(Mutex::new(HashMap::new())),
            resets: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Whether replication to `addr` may use `StreamAppend` (it did not refuse it lately).
    fn streams_to(&self, addr: &str) -> bool {
        let Ok(mut refused) = self.no_stream.lock() else {
            return true;
        };
        match refused.get(addr) {
            Some(at) if at.elapsed() < NO_STREAM_RETRY => false,
            Some(_) => {
                refused.remove(addr);
                true
            }
            None => true,
        }
    }

    /// Takes note that the peer at `addr` does not serve `StreamAppend`.
    fn no_stream(&self, addr: &str) {
        if let Ok(mut refused) = self.no_stream.lock() {
            tracing::info!(
                peer = addr,
                "the peer does not serve StreamAppend (a previous build?): \
                 replicating to it with AppendEntries calls"
            );
            refused.insert(addr.to_string(), Instant::now());
        }
    }

    /// Drops every open channel and ends every open replication stream: the next call to a
    /// peer connects (and authenticates) anew.
    pub fn reset(&self) {
        if let Ok(mut channels) = self.channels.lock() {
            channels.clear();
        }
        self.resets.send_modify(|n| *n += 1);
    }

    /// Takes note of a peer's refusal: when it refused this node's certificate (the
    /// connection was made with one it no longer accepts), the channel goes, so the next call
    /// connects anew with the certificate this node presents now.
    pub fn refused(&self, addr: &str, status: &tonic::Status) {
        if status.code() == tonic::Code::Unauthenticated
            && let Ok(mut channels) = self.channels.lock()
        {
            channels.remove(addr);
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
                // The scheme is http because the connector below does the TLS itself.
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
                    .connect_timeout(self.connect_timeout)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5));
                let (tls, target, local_ip, timeout) = (
                    self.tls.clone(),
                    addr.to_string(),
                    self.local_ip,
                    self.connect_timeout,
                );
                let channel = endpoint.connect_with_connector_lazy(tower::service_fn(
                    move |_: tonic::transport::Uri| {
                        connect_tls(tls.clone(), target.clone(), local_ip, timeout)
                    },
                ));
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
        PeerConnection {
            self_id: self.self_id,
            target,
            target_incarnation: node.incarnation,
            pool: self.pool.clone(),
            addr: node.peer_addr.clone(),
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
    /// The channel is taken from the pool on every call (and a replication stream ends on a
    /// reset), so a [`PeerPool::reset`] takes effect at once.
    pool: PeerPool,
    addr: String,
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

fn timed_out(action: RPCTypes, ids: (NodeId, NodeId), timeout: Duration) -> RPCError<TypeConfig> {
    RPCError::Timeout(Timeout {
        action,
        id: ids.0,
        target: ids.1,
        timeout,
    })
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

/// How long a peer message may take to be answered: openraft's deadline is one heartbeat
/// interval, too short for a large batch, so at least half a second plus the transfer time at
/// a modest 32 MiB/s.
fn message_ttl(option: &RPCOption, bytes: usize) -> Duration {
    option.hard_ttl().max(Duration::from_millis(500))
        + Duration::from_secs_f64(bytes as f64 / (32.0 * 1024.0 * 1024.0))
}

/// The requests of one replication stream that were sent and not yet answered.
struct InFlight {
    /// When each was sent and how long its answer may take, oldest first.
    sent: Mutex<VecDeque<(Instant, Duration)>>,
    /// Signalled when a request is sent.
    sending: tokio::sync::Notify,
    /// Room for [`STREAM_DEPTH`] unanswered requests.
    window: tokio::sync::Semaphore,
}

impl InFlight {
    /// The queue of sent requests (consistent even if a holder panicked: each change is one
    /// push or pop).
    fn sent(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Duration)>> {
        self.sent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn oldest(&self) -> Option<(Instant, Duration)> {
        self.sent().front().copied()
    }
}

/// The messages of a replication stream: each request openraft makes, once fewer than
/// [`STREAM_DEPTH`] are unanswered (so that a request carries every entry appended while it
/// waited). Ends with the input, or as soon as the answers are dropped (`stop` closes): the
/// replication session ended, and neither openraft's request generator nor the HTTP/2 stream
/// may outlive it (h2 keeps a stream open while its sending half is).
fn outgoing<S>(
    input: S,
    in_flight: Arc<InFlight>,
    stop: tokio::sync::watch::Receiver<()>,
    target: (NodeId, u64),
    option: RPCOption,
) -> impl Stream<Item = Payload> + Send + 'static
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    futures::stream::unfold(
        (input, in_flight, stop),
        move |(mut input, in_flight, mut stop)| {
            let option = option.clone();
            async move {
                let next = async {
                    in_flight.window.acquire().await.ok()?.forget();
                    let request = input.next().await?;
                    let data = match encode(&request) {
                        Ok(data) => data,
                        Err(e) => {
                            tracing::error!(target_node = target.0, error = %e, "cannot encode an append request; ending the replication stream");
                            return None;
                        }
                    };
                    let at = Instant::now();
                    injected_delay().await;
                    in_flight
                        .sent()
                        .push_back((at, message_ttl(&option, data.len())));
                    in_flight.sending.notify_one();
                    Some(Payload {
                        data,
                        target_id: target.0,
                        target_incarnation: target.1,
                    })
                };
                let payload = tokio::select! {
                    biased;
                    // Only ever closed: nothing is sent on it.
                    _ = stop.changed() => None,
                    payload = next => payload,
                }?;
                Some((payload, (input, in_flight, stop)))
            }
        },
    )
}

/// The answers of a replication stream, in order. Fails when an answer is later than its
/// request's time to live (counted from when it was sent, or from the previous answer if that
/// came later); idle, it waits for the next request.
struct Incoming {
    answers: tonic::Streaming<Payload>,
    in_flight: Arc<InFlight>,
    /// Dropped with the answers: ends [`outgoing`].
    _stop: tokio::sync::watch::Sender<()>,
    /// Changes on a [`PeerPool::reset`].
    resets: tokio::sync::watch::Receiver<u64>,
    pool: PeerPool,
    addr: String,
    ids: (NodeId, NodeId),
    last_answer: Instant,
}

impl Incoming {
    async fn next(
        &mut self,
    ) -> Option<Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> {
        let (_, target) = self.ids;
        let message = loop {
            let due = self
                .in_flight
                .oldest()
                .map(|(at, ttl)| (at.max(self.last_answer) + ttl, ttl));
            let late = async {
                match due {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = self.answers.message() => break m,
                // Idle: a request sent now gets its deadline on the next turn.
                _ = self.in_flight.sending.notified(), if due.is_none() => continue,
                () = late => {
                    let ttl = due.map_or(Duration::ZERO, |(_, ttl)| ttl);
                    return Some(Err(timed_out(RPCTypes::AppendEntries, self.ids, ttl)));
                }
                _ = self.resets.changed() => {
                    return Some(Err(RPCError::Unreachable(Unreachable::from_string(
                        "this node's peer connections were reset".to_string(),
                    ))));
                }
            }
        };
        let payload = match message {
            Ok(None) if self.in_flight.oldest().is_some() => {
                return Some(Err(RPCError::Unreachable(Unreachable::from_string(
                    format!("node {target} ended the replication stream with requests unanswered"),
                ))));
            }
            Ok(None) => return None,
            Ok(Some(p)) => p,
            Err(s) => {
                self.pool.refused(&self.addr, &s);
                return Some(Err(status_error(&s)));
            }
        };
        let answered = self.in_flight.sent().pop_front();
        if answered.is_none() {
            return Some(Err(RPCError::Network(NetworkError::from_string(format!(
                "node {target} answered an append that was not sent"
            )))));
        }
        self.in_flight.window.add_permits(1);
        self.last_answer = Instant::now();
        let answer: Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>> =
            match decode(&payload.data) {
                Ok(a) => a,
                Err(s) => return Some(Err(status_error(&s))),
            };
        Some(answer.map_err(|e| remote_fatal(target, e)))
    }

    /// As a stream that ends after its first error or refusal (a conflict or a higher vote),
    /// as openraft expects.
    fn into_stream(
        self,
    ) -> impl Stream<Item = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> + Send
    {
        futures::stream::unfold(Some(self), |state| async move {
            let mut incoming = state?;
            let item = incoming.next().await?;
            let go_on = matches!(item, Ok(Ok(_)));
            Some((item, go_on.then_some(incoming)))
        })
    }
}

impl PeerConnection {
    fn client(&self) -> Result<PeerClient<Channel>, RPCError<TypeConfig>> {
        if self.target == self.self_id {
            return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                "node {} refuses to open a connection to itself",
                self.target
            ))));
        }
        self.pool
            .client(&self.addr)
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
        let ttl = message_ttl(option, data.len());
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
            .map_err(|_| timed_out(action, (self.self_id, self.target), ttl))?
            .map_err(|s| {
                self.pool.refused(&self.addr, &s);
                status_error(&s)
            })?;
        let result: Result<Resp, RaftError<TypeConfig>> =
            decode(&response.into_inner().data).map_err(|s| status_error(&s))?;
        result.map_err(|e| remote_fatal(self.target, e))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotData;

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

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        // A single request (openraft's heartbeats) gains nothing from a stream: one call is
        // cheaper than opening a stream and the follower's pipeline for it.
        if input.size_hint() == (1, Some(1)) || !self.pool.streams_to(&self.addr) {
            return openraft::network::stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let mut client = self.client()?;
            let in_flight = Arc::new(InFlight {
                sent: Mutex::new(VecDeque::new()),
                sending: tokio::sync::Notify::new(),
                window: tokio::sync::Semaphore::new(STREAM_DEPTH),
            });
            let mut resets = self.pool.resets.subscribe();
            resets.mark_unchanged();
            let (stop, stopped) = tokio::sync::watch::channel(());
            let requests = outgoing(
                input,
                in_flight.clone(),
                stopped,
                (self.target, self.target_incarnation),
                option.clone(),
            );
            let setup = message_ttl(&option, 0);
            let answers = match tokio::time::timeout(setup, client.stream_append(requests)).await {
                Err(_) => {
                    return Err(timed_out(
                        RPCTypes::AppendEntries,
                        (self.self_id, self.target),
                        setup,
                    ));
                }
                Ok(Err(s)) => {
                    if s.code() == tonic::Code::Unimplemented {
                        self.pool.no_stream(&self.addr);
                    }
                    self.pool.refused(&self.addr, &s);
                    return Err(status_error(&s));
                }
                Ok(Ok(response)) => response.into_inner(),
            };
            let incoming = Incoming {
                answers,
                in_flight,
                _stop: stop,
                resets,
                pool: self.pool.clone(),
                addr: self.addr.clone(),
                ids: (self.self_id, self.target),
                last_answer: Instant::now(),
            };
            let stream: BoxStream<'s, _> = Box::pin(incoming.into_stream());
            Ok(stream)
        })
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
        // This node's own snapshot is its state file: export an image of it now. The image
        // carries its own position, at or after the snapshot's (the follower installs that
        // position; openraft counts the follower as far as the snapshot's, and the entries in
        // between that it sends next are already committed there, so they are skipped).
        let (meta, data) = match snapshot.snapshot {
            SnapshotData::Image(image) => (snapshot.meta, image),
            SnapshotData::Local(store) => crate::state_machine::export_snapshot(store)
                .await
                .map_err(|e| {
                    StreamingError::StorageError(openraft::StorageError::read_snapshot(
                        None,
                        openraft::errors::ErrorSource::from_error(&e),
                    ))
                })?,
        };
        let vote_bytes = encode(&vote).map_err(|s| StreamingError::from(status_error(&s)))?;
        let meta_bytes = encode(&meta).map_err(|s| StreamingError::from(status_error(&s)))?;
        let total = data.len();
        let pieces = total.div_ceil(SNAPSHOT_CHUNK).max(1);
        let first = SnapshotChunk {
            vote: vote_bytes,
            meta: meta_bytes,
            target_id: self.target,
            target_incarnation: self.target_incarnation,
            ..SnapshotChunk::default()
        };
        // Chunks are cut as they are sent: the image is not copied whole a second time.
        let mut first = Some(first);
        let chunks = (0..pieces).map(move |i| {
            let piece =
                &data[(i * SNAPSHOT_CHUNK).min(total)..((i + 1) * SNAPSHOT_CHUNK).min(total)];
            crate::tap::outgoing(piece);
            SnapshotChunk {
                data: piece.to_vec(),
                ..first.take().unwrap_or_default()
            }
        });
        tracing::info!(
            target_node = self.target,
            bytes = total,
            chunks = pieces,
            last_log_id = ?meta.last_log_id,
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
            .map_err(|s| {
                self.pool.refused(&self.addr, &s);
                StreamingError::from(status_error(&s))
            })?;
        let result: Result<SnapshotResponse<TypeConfig>, openraft::errors::Fatal<TypeConfig>> =
            decode(&response.into_inner().data)
                .map_err(|s| StreamingError::from(status_error(&s)))?;
        result.map_err(|e| StreamingError::from(remote_fatal(self.target, e)))
    }
}
