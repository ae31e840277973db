//! The wrap engine (`coffer.wrap.v1.Wrap`): stores ciphertext a sender made for a recipient
//! identity, releases it once to that identity, and lets the leader remove what expired. The
//! records are described in [`crate::wrap`]. The cluster never holds a key that opens the
//! ciphertext: the sender's SDK encrypts to the recipient's public key, the recipient's SDK
//! decrypts.

use coffer_api::wrap::v1 as wpb;
use coffer_api::wrap::v1::wrap_server::Wrap;

use super::*;
use crate::wrap::{self as wraps, CleanUp, Wrapped};

/// Creating wrapped data for identity NAME is authorized at this path and NAME (`create`).
pub const WRAP_TO: &str = "wrap/to";

impl Api {
    fn wrap_header(&self, request_id: &[u8], revision: u64) -> Option<wpb::ResponseHeader> {
        Some(wpb::ResponseHeader {
            request_id: request_id.to_vec(),
            node_id: self.node.id(),
            revision,
        })
    }

    /// The identity that holds `key` (after a read index), or FAILED_PRECONDITION.
    async fn identity_with_key(
        &self,
        keyring: &Keyring,
        key: &PublicKey,
    ) -> Result<String, Status> {
        let fingerprint = key.fingerprint();
        if self.admin_identity()?.fingerprint == fingerprint {
            return Ok(identity::ADMIN.to_string());
        }
        self.node.linearize().await.map_err(raft_status)?;
        let index = identity::key_index(&fingerprint);
        let view = self.node.store().read().map_err(storage_status)?;
        match view.get(&index).map_err(storage_status)? {
            Some(e) => {
                Ok(String::from_utf8_lossy(&self.decrypt(keyring, &index, &e.value)?).into_owned())
            }
            None => Err(Status::failed_precondition(format!(
                "no identity has the key {fingerprint}: wrapped data is for an identity that can log in to read it (`coffer identity create NAME --public-key FILE`)"
            ))),
        }
    }

    /// The wrap at `raw` and its `mod_revision`, read now (after a read index).
    async fn read_wrap(
        &self,
        keyring: &Keyring,
        raw: &[u8],
    ) -> Result<Option<(Wrapped, u64)>, Status> {
        self.node.linearize().await.map_err(raft_status)?;
        self.read_record(keyring, &wraps::store_key(raw))
    }

    /// Removes expired wraps and empties consumed ones past their retry window, if this node
    /// leads. At most 1,000 changes per call. Returns how many records it changed.
    pub async fn clean_up_wraps(&self) -> Result<usize, Status> {
        if self.node.leader_id() != Some(self.node.id()) {
            return Ok(0);
        }
        let keyring = self.keyring()?;
        let now = auth::now_ms();
        let view = self.node.store().read().map_err(storage_status)?;
        let mut ops = Vec::new();
        for e in entries_under(&view, wraps::PREFIX, 10_000)? {
            let Ok(plain) = keyring.decrypt(&e.key, &e.value) else {
                continue; // left for an operator to look at
            };
            let Ok(mut w) = postcard::from_bytes::<Wrapped>(&plain) else {
                continue;
            };
            let op = match w.clean_up(now) {
                CleanUp::Keep => continue,
                CleanUp::Remove => Op::Delete { key: e.key.clone() },
                CleanUp::Empty => {
                    w.encapsulated_key.clear();
                    w.ciphertext.clear();
                    Op::Put {
                        value: self.sealed_record(&keyring, &e.key, &w)?,
                        key: e.key.clone(),
                    }
                }
            };
            ops.push((Compare::ModRevision(e.key, e.mod_revision), op));
            if ops.len() == 1000 {
                break;
            }
        }
        drop(view);
        let mut changed = 0;
        for chunk in ops.chunks(64) {
            let txn = Txn {
                compare: chunk.iter().map(|(c, _)| c.clone()).collect(),
                success: chunk.iter().map(|(_, o)| o.clone()).collect(),
                failure: Vec::new(),
            };
            if self.write(txn, &[]).await?.result.succeeded {
                changed += chunk.len();
            }
        }
        Ok(changed)
    }

    /// Runs [`Api::clean_up_wraps`] at the login clean-up interval, for as long as the node runs.
    pub async fn clean_up_wraps_loop(self) {
        let mut tick = tokio::time::interval(self.login.cleanup_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            match self.clean_up_wraps().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "removed expired wrapped data"),
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {} // sealed
                Err(e) => {
                    tracing::warn!(error = %e.message(), "wrap clean-up failed; trying again later")
                }
            }
        }
    }
}

fn unwrap_answer(
    api: &Api,
    request_id: &[u8],
    revision: u64,
    raw: &[u8],
    w: Wrapped,
) -> wpb::UnwrapResponse {
    wpb::UnwrapResponse {
        header: api.wrap_header(request_id, revision),
        encapsulated_key: w.encapsulated_key,
        ciphertext: w.ciphertext,
        sender: w.sender,
        created_ms: w.created_ms,
        expires_ms: w.expires_ms,
        wrap_id: raw.to_vec(),
    }
}

fn consumed_status(id: &str, at: u64) -> Status {
    Status::not_found(format!(
        "wrapped data {id} was already consumed at {at} ms (Unix time); it can be read once: ask the sender to wrap it again"
    ))
}

#[tonic::async_trait]
impl Wrap for Api {
    async fn create(
        &self,
        req: Request<wpb::CreateRequest>,
    ) -> Result<Response<wpb::CreateResponse>, Status> {
        self.timed("WrapCreate", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            parse_request_id(&r.request_id)?;
            let key = PublicKey::from_bytes(&r.recipient_key).map_err(|e| {
                Status::invalid_argument(format!(
                    "the recipient key is not a Coffer public key with an X25519 half ({e:#}); use the recipient's NAME.pub from `coffer keygen`"
                ))
            })?;
            if r.encapsulated_key.len() != 32 {
                return Err(Status::invalid_argument(format!(
                    "malformed ciphertext: the HPKE encapsulated key is {} bytes, an X25519 one is 32",
                    r.encapsulated_key.len()
                )));
            }
            if r.ciphertext.len() < 16 {
                return Err(Status::invalid_argument(
                    "malformed ciphertext: shorter than its authentication tag",
                ));
            }
            self.check_value(&r.ciphertext)?;
            let raw: [u8; 16] = r.wrap_id.as_slice().try_into().map_err(|_| {
                Status::invalid_argument(format!(
                    "the wrap id is 16 random bytes, not {}",
                    r.wrap_id.len()
                ))
            })?;
            if !wraps::TTL_RANGE_MS.contains(&r.ttl_ms) {
                return Err(Status::invalid_argument(format!(
                    "a wrap lives 1 s to 30 days, not {} ms",
                    r.ttl_ms
                )));
            }
            let keyring = self.keyring()?;
            let recipient = self.identity_with_key(&keyring, &key).await?;
            let path = format!("{WRAP_TO}/{recipient}");
            self.permit(grant.clone(), |g| allow(g, &path, Capability::Create))
                .await?;
            let now = auth::now_ms();
            let record = Wrapped {
                sender: grant.identity.clone(),
                recipient: recipient.clone(),
                recipient_key: r.recipient_key,
                created_ms: now,
                expires_ms: now + r.ttl_ms,
                encapsulated_key: r.encapsulated_key,
                ciphertext: r.ciphertext,
                consumed: None,
            };
            let store_key = wraps::store_key(&raw);
            let txn = Txn {
                compare: vec![Compare::Absent(store_key.clone())],
                success: vec![Op::Put {
                    value: self.sealed_record(&keyring, &store_key, &record)?,
                    key: store_key,
                }],
                failure: Vec::new(),
            };
            let w = self.write(txn, &r.request_id).await?;
            if !w.result.succeeded {
                return Err(Status::already_exists(format!(
                    "the wrap id {} is taken; wrap again (a new random id)",
                    wraps::printable_id(&raw)
                )));
            }
            tracing::info!(sender = grant.identity, recipient, "wrapped data stored");
            Ok(wpb::CreateResponse {
                header: self.wrap_header(&r.request_id, w.result.revision),
                id: wraps::printable_id(&raw),
                expires_ms: record.expires_ms,
                recipient,
            })
        })
        .await
    }

    async fn unwrap(
        &self,
        req: Request<wpb::UnwrapRequest>,
    ) -> Result<Response<wpb::UnwrapResponse>, Status> {
        self.timed("WrapUnwrap", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            parse_request_id(&r.request_id)?;
            let raw = wraps::parse_id(&r.id).map_err(Status::invalid_argument)?;
            let keyring = self.keyring()?;
            let store_key = wraps::store_key(&raw);
            let gone = || {
                Status::not_found(format!(
                    "no wrapped data {}: it never existed, or it expired and was removed",
                    r.id
                ))
            };
            // Decided at most twice: a read that lost a race learns who won.
            for _ in 0..2 {
                let (w, rev) = self.read_wrap(&keyring, &raw).await?.ok_or_else(gone)?;
                if grant.identity_key.as_deref() != Some(w.recipient_key.as_slice()) {
                    tracing::info!(
                        identity = grant.identity,
                        recipient = w.recipient,
                        "unwrap by another identity refused"
                    );
                    return Err(Status::permission_denied(format!(
                        "{} was wrapped for identity {:?}; log in as that identity (with its key) to read it",
                        r.id, w.recipient
                    )));
                }
                let now = auth::now_ms();
                if now >= w.expires_ms {
                    return Err(Status::not_found(format!(
                        "wrapped data {} expired at {} ms (Unix time); ask the sender to wrap it again",
                        r.id, w.expires_ms
                    )));
                }
                if let Some((at, by)) = &w.consumed {
                    // The same request again (its first answer was lost): the same data.
                    if !r.request_id.is_empty() && *by == r.request_id && !w.ciphertext.is_empty() {
                        let revision = self.revision_now()?;
                        return Ok(unwrap_answer(self, &r.request_id, revision, &raw, w));
                    }
                    return Err(consumed_status(&r.id, *at));
                }
                let mut tombstone = w.clone();
                tombstone.consumed = Some((now, r.request_id.clone()));
                if r.request_id.is_empty() {
                    tombstone.encapsulated_key.clear();
                    tombstone.ciphertext.clear();
                }
                let txn = Txn {
                    compare: vec![Compare::ModRevision(store_key.clone(), rev)],
                    success: vec![Op::Put {
                        value: self.sealed_record(&keyring, &store_key, &tombstone)?,
                        key: store_key.clone(),
                    }],
                    failure: Vec::new(),
                };
                let written = self.write(txn, &r.request_id).await?;
                if written.result.succeeded {
                    tracing::info!(identity = grant.identity, sender = w.sender, "wrapped data consumed");
                    return Ok(unwrap_answer(self, &r.request_id, written.result.revision, &raw, w));
                }
            }
            Err(Status::aborted(format!(
                "{} changed while it was read; try again",
                r.id
            )))
        })
        .await
    }

    async fn lookup(
        &self,
        req: Request<wpb::LookupRequest>,
    ) -> Result<Response<wpb::LookupResponse>, Status> {
        self.timed("WrapLookup", async {
            let grant = self.caller(&req).await?;
            let r = req.into_inner();
            let raw = wraps::parse_id(&r.id).map_err(Status::invalid_argument)?;
            let keyring = self.keyring()?;
            let (w, _) = self.read_wrap(&keyring, &raw).await?.ok_or_else(|| {
                Status::not_found(format!(
                    "no wrapped data {}: it never existed, or it expired and was removed",
                    r.id
                ))
            })?;
            let recipient = grant.identity_key.as_deref() == Some(w.recipient_key.as_slice());
            if !recipient && grant.identity != w.sender {
                return Err(Status::permission_denied(format!(
                    "only the sender and the recipient of {} may look it up",
                    r.id
                )));
            }
            let fingerprint = PublicKey::from_bytes(&w.recipient_key)
                .map(|k| k.fingerprint())
                .unwrap_or_default();
            let revision = self.revision_now()?;
            Ok(wpb::LookupResponse {
                header: self.wrap_header(&[], revision),
                sender: w.sender,
                recipient: w.recipient,
                recipient_fingerprint: fingerprint,
                created_ms: w.created_ms,
                expires_ms: w.expires_ms,
                consumed_ms: w.consumed.map_or(0, |(at, _)| at),
            })
        })
        .await
    }
}
