//! `coffer operator init | unseal`: the operator's side of the key ceremony. Private keys and
//! key shares are used here, on the operator's machine, and never sent anywhere.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use coffer_api::v1 as pb;
use coffer_api::v1::seal_client::SealClient;
use tonic::transport::Channel;

use crate::cli::{OperatorCommand, status_error};
use crate::client::Target;
use crate::keys::{KeyPair, PublicKey};
use crate::seal::{
    Action, Operator, RekeyProposal, SHARE_INFO, ShareFile, action_message, rekey_message,
    unseal_message,
};
use crate::threshold;

/// Lower-case hex (share files, checksums).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes hex (as in share files).
pub fn unhex(s: &str) -> Result<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        bail!("odd number of hex digits");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("not hex"))
        .collect()
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// What init did.
#[derive(Debug)]
pub struct InitReport {
    /// The new key set's id.
    pub cluster_id: String,
    /// Operator names (from the key file names) and their share files.
    pub shares: Vec<(String, PathBuf)>,
}

/// Operators read from public key files: names (the file stems), keys, and the share files
/// they will get in `share_dir` (none of which may exist yet).
struct NewOperators {
    names: Vec<String>,
    keys: Vec<Vec<u8>>,
    files: Vec<PathBuf>,
}

impl NewOperators {
    fn load(operator_keys: &[PathBuf], threshold: u32, share_dir: &Path) -> Result<NewOperators> {
        let mut names = Vec::new();
        let mut keys = Vec::new();
        for path in operator_keys {
            let name = stem(path);
            if names.contains(&name) {
                bail!(
                    "two operator key files are named {name}: share files are named after them, so give each operator a distinct file name"
                );
            }
            keys.push(PublicKey::load(path)?.to_bytes().to_vec());
            names.push(name);
        }
        threshold::check_threshold(keys.len(), threshold as usize)?;
        let files: Vec<PathBuf> = names
            .iter()
            .map(|n| share_dir.join(format!("{n}.share")))
            .collect();
        if let Some(f) = files.iter().find(|f| f.exists()) {
            bail!(
                "{} already exists: move old share files away first (they are never overwritten)",
                f.display()
            );
        }
        Ok(NewOperators { names, keys, files })
    }

    /// Writes each operator's share file (0600).
    fn write_shares(
        self,
        cluster_id: &str,
        threshold: u32,
        encrypted: &[Vec<u8>],
    ) -> Result<InitReport> {
        if encrypted.len() != self.files.len() {
            bail!(
                "the node returned {} shares for {} operators",
                encrypted.len(),
                self.files.len()
            );
        }
        for (i, file) in self.files.iter().enumerate() {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let share = ShareFile {
                cluster_id: cluster_id.to_string(),
                operator_index: i as u32,
                operator_fingerprint: PublicKey::from_bytes(&self.keys[i])?.fingerprint(),
                threshold,
                encrypted_share: hex(&encrypted[i]),
            };
            crate::tls::write_private(file, &serde_json::to_string_pretty(&share)?)?;
        }
        Ok(InitReport {
            cluster_id: cluster_id.to_string(),
            shares: self.names.into_iter().zip(self.files).collect(),
        })
    }
}

/// Initializes the cluster at `target` and writes one share file per operator into
/// `share_dir` (never overwriting one).
pub async fn init(
    target: &Target,
    operator_keys: &[PathBuf],
    threshold: u32,
    admin_key: &Path,
    share_dir: &Path,
) -> Result<InitReport> {
    let new = NewOperators::load(operator_keys, threshold, share_dir)?;
    let admin = PublicKey::load(admin_key)?;
    let mut seal = SealClient::new(target.connect().await?);
    let done = seal
        .init(pb::InitRequest {
            operator_keys: new.keys.clone(),
            operator_names: new.names.clone(),
            threshold,
            admin_key: admin.to_bytes().to_vec(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    new.write_shares(&done.cluster_id, threshold, &done.encrypted_shares)
}

/// What a rekey submission achieved.
#[derive(Debug)]
pub enum RekeyReport {
    /// More current operators must run the same rekey.
    Pending {
        /// Current operators needed.
        threshold: u32,
        /// Those who authorized it so far.
        submitted: Vec<String>,
    },
    /// Done: the new share files.
    Done(InitReport),
}

/// Authorizes a rekey to the operators in `new_keys` (threshold `new_threshold`) with this
/// operator's key and share; the submission that completes it writes the new share files into
/// `share_dir`. Every authorizing operator runs it with the same new keys and threshold.
pub async fn rekey(
    target: &Target,
    key: &Path,
    share: &Path,
    new_keys: &[PathBuf],
    new_threshold: u32,
    share_dir: &Path,
) -> Result<RekeyReport> {
    let new = NewOperators::load(new_keys, new_threshold, share_dir)?;
    let mut seal = SealClient::new(target.connect().await?);
    let status = initialized_status(&mut seal).await?;
    let mine = my_decryption_share(key, share, &status)?;
    let proposal = RekeyProposal {
        operators: new
            .names
            .iter()
            .zip(&new.keys)
            .map(|(name, public_key)| Operator {
                name: name.clone(),
                public_key: public_key.clone(),
            })
            .collect(),
        threshold: new_threshold,
    };
    let signature = mine.pair.sign(&rekey_message(
        &status.cluster_id,
        status.config_revision,
        &proposal.digest()?,
        mine.index,
        &mine.share,
    ));
    let answer = seal
        .rekey(pb::RekeyRequest {
            cluster_id: status.cluster_id,
            config_revision: status.config_revision,
            new_operator_keys: new.keys.clone(),
            new_operator_names: new.names.clone(),
            new_threshold,
            operator_index: mine.index,
            decryption_share: mine.share,
            signature: signature.to_vec(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if !answer.done {
        return Ok(RekeyReport::Pending {
            threshold: answer.threshold,
            submitted: answer.submitted,
        });
    }
    Ok(RekeyReport::Done(new.write_shares(
        &answer.cluster_id,
        new_threshold,
        &answer.encrypted_shares,
    )?))
}

/// The contacted node's seal status, or an error if it has no seal configuration.
async fn initialized_status(seal: &mut SealClient<Channel>) -> Result<pb::SealStatusResponse> {
    let status = seal
        .seal_status(pb::SealStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if !status.initialized {
        bail!(
            "node {} has no seal configuration: the cluster is not initialized (run `coffer operator init`) or this node has not caught up",
            status.node_id
        );
    }
    Ok(status)
}

/// What an unseal submission achieved.
#[derive(Debug)]
pub struct UnsealReport {
    /// The node the share went to.
    pub node_id: u64,
    /// Whether that node is still sealed.
    pub sealed: bool,
    /// Shares needed.
    pub threshold: u32,
    /// Operators whose shares it holds.
    pub submitted: Vec<String>,
}

/// An operator's decryption share of the master-key ciphertext, made here from their share
/// file and key.
struct MyShare {
    pair: KeyPair,
    index: u32,
    share: Vec<u8>,
}

/// Opens `share` with `key` (checking that both belong together and to this cluster) and
/// computes the decryption share of `status.master_ciphertext`.
fn my_decryption_share(
    key: &Path,
    share: &Path,
    status: &pb::SealStatusResponse,
) -> Result<MyShare> {
    let pair = KeyPair::load(key)?;
    let text = std::fs::read_to_string(share)
        .with_context(|| format!("cannot read the share file {}", share.display()))?;
    let file: ShareFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "the share file {} is corrupt (not the JSON `coffer operator init` wrote)",
            share.display()
        )
    })?;
    let mine = pair.public().fingerprint();
    if file.operator_fingerprint != mine {
        bail!(
            "{} belongs to the operator with key {}, but {} is key {mine}: use your own key and share file",
            share.display(),
            file.operator_fingerprint,
            key.display()
        );
    }
    if status.cluster_id != file.cluster_id {
        bail!(
            "{} is for key set {}, but this cluster's is {} (a share replaced by a rekey, or another cluster's)",
            share.display(),
            file.cluster_id,
            status.cluster_id
        );
    }
    let mut info = SHARE_INFO.to_vec();
    info.extend_from_slice(file.cluster_id.as_bytes());
    let sealed_share = unhex(&file.encrypted_share)
        .with_context(|| format!("the share file {} is corrupt", share.display()))?;
    let secret = pair
        .open(&info, &sealed_share)
        .with_context(|| format!("cannot open {} with {}", share.display(), key.display()))?;
    let share = threshold::decryption_share(&secret, &status.master_ciphertext)?;
    Ok(MyShare {
        pair,
        index: file.operator_index,
        share,
    })
}

/// Opens `share` with `key`, computes and signs a decryption share here, and submits it to
/// the node at `target`.
pub async fn unseal(target: &Target, key: &Path, share: &Path) -> Result<UnsealReport> {
    let mut seal = SealClient::new(target.connect().await?);
    let status = initialized_status(&mut seal).await?;
    let mine = my_decryption_share(key, share, &status)?;
    let signature = mine.pair.sign(&unseal_message(
        &status.cluster_id,
        &status.master_ciphertext,
        status.seal_revision,
        mine.index,
        &mine.share,
    ));
    let answer = seal
        .unseal(pb::UnsealRequest {
            cluster_id: status.cluster_id,
            seal_revision: status.seal_revision,
            operator_index: mine.index,
            decryption_share: mine.share,
            signature: signature.to_vec(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(UnsealReport {
        node_id: status.node_id,
        sealed: answer.sealed,
        threshold: answer.threshold,
        submitted: answer.submitted,
    })
}

/// Signs `action` with the operator key `key` and sends it. Returns the active data key
/// number on the node that ran it.
pub async fn act(target: &Target, key: &Path, action: Action) -> Result<u32> {
    let pair = KeyPair::load(key)?;
    let mut seal = SealClient::new(target.connect().await?);
    let status = initialized_status(&mut seal).await?;
    let mine = pair.public().to_bytes();
    let index = status
        .operator_keys
        .iter()
        .position(|k| k.as_slice() == mine.as_slice())
        .with_context(|| {
            format!(
                "{} (key {}) is not one of this cluster's operators",
                key.display(),
                pair.public().fingerprint()
            )
        })?;
    let revision = match action {
        Action::PeerUnseal(_) => status.peer_unseal_revision,
        Action::Seal => status.seal_revision,
        Action::Rotate => status.keyring_revision,
    };
    let signature = pair.sign(&action_message(&status.cluster_id, action, revision));
    let done = seal
        .operator_action(pb::OperatorActionRequest {
            action: action.as_str().into(),
            operator_index: index as u32,
            revision,
            signature: signature.to_vec(),
        })
        .await
        .map_err(status_error)?;
    Ok(done.into_inner().data_key)
}

/// What `coffer operator snapshot save` wrote.
#[derive(Debug)]
pub struct SavedBackup {
    /// The header of the file.
    pub header: crate::backup::Header,
    /// Its size.
    pub bytes: usize,
    /// Its SHA-256 trailer, in hex.
    pub checksum: String,
}

/// Saves a backup of the cluster at `target` (which carries an administrator's session) to
/// `file`, verified before it is written, durably; never over an existing file.
pub async fn snapshot_save(target: &Target, file: &Path) -> Result<SavedBackup> {
    if file.exists() {
        bail!(
            "{} already exists: choose another file name (a backup is never overwritten)",
            file.display()
        );
    }
    let mut cluster = target.cluster().await?;
    let mut stream = cluster
        .snapshot_save(pb::SnapshotSaveRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        bytes.extend_from_slice(&chunk.data);
    }
    let backup = crate::backup::decode(&bytes)
        .context("the backup the node sent does not verify; nothing was written")?;
    crate::backup::write_file(file, &bytes)?;
    Ok(SavedBackup {
        header: backup.header,
        bytes: bytes.len(),
        checksum: crate::backup::hex(&backup.checksum),
    })
}

/// Restores backup `file` into the uninitialized cluster at `target`, signed with the operator
/// key `key` (one of the backup's operators). The file is checked here first, then again by
/// the node, before anything is written.
pub async fn snapshot_restore(
    target: &Target,
    file: &Path,
    key: &Path,
) -> Result<pb::SnapshotRestoreResponse> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let backup = crate::backup::decode(&bytes)
        .with_context(|| format!("{} cannot be restored; nothing was sent", file.display()))?;
    let config = backup.seal_config()?;
    let pair = KeyPair::load(key)?;
    let mine = pair.public().to_bytes();
    let index = config
        .operators
        .iter()
        .position(|o| o.public_key.as_slice() == mine.as_slice())
        .with_context(|| {
            format!(
                "{} (key {}) is not one of the backup's operators ({}): sign the restore with one of their keys",
                key.display(),
                pair.public().fingerprint(),
                config.operator_names()
            )
        })?;
    let signature = pair.sign(&crate::backup::restore_message(&backup.checksum));
    drop(backup);
    let messages: Vec<pb::SnapshotRestoreRequest> = bytes
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, data)| pb::SnapshotRestoreRequest {
            data: data.to_vec(),
            operator_index: if i == 0 { index as u32 } else { 0 },
            signature: if i == 0 {
                signature.to_vec()
            } else {
                Vec::new()
            },
        })
        .collect();
    let mut cluster = coffer_api::v1::cluster_client::ClusterClient::new(target.connect().await?)
        .max_decoding_message_size(16 << 20);
    Ok(cluster
        .snapshot_restore(tokio_stream::iter(messages))
        .await
        .map_err(status_error)?
        .into_inner())
}

async fn snapshot_command(op: crate::cli::SnapshotCommand) -> Result<()> {
    use crate::cli::SnapshotCommand;
    match op {
        SnapshotCommand::Save { file, mut client } => {
            // Building and streaming a large store takes longer than one request.
            client.timeout = client.timeout.max(300.0);
            let target = client.session_target().await?;
            let saved = snapshot_save(&target, &file).await?;
            println!(
                "saved {}: revision {}, {} records, {} bytes, sha256 {}",
                file.display(),
                saved.header.source_revision,
                saved.header.records,
                saved.bytes,
                saved.checksum
            );
            Ok(())
        }
        SnapshotCommand::Inspect { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let backup = crate::backup::decode(&bytes)?;
            let config = backup.seal_config()?;
            println!(
                "{}: a valid backup (format {}), revision {}, {} records, {} bytes, sha256 {}",
                file.display(),
                crate::backup::FORMAT_VERSION,
                backup.header.source_revision,
                backup.header.records,
                bytes.len(),
                crate::backup::hex(&backup.checksum)
            );
            println!(
                "saved at {} ms since the epoch; key set {}: {} of {} operators ({}) unseal it",
                backup.header.created_ms,
                config.cluster_id,
                config.threshold,
                config.operators.len(),
                config.operator_names()
            );
            Ok(())
        }
        SnapshotCommand::Restore {
            file,
            key,
            mut client,
        } => {
            client.timeout = client.timeout.max(300.0);
            let r = snapshot_restore(&client.target()?, &file, &key).await?;
            println!(
                "restored {} records (source revision {}) into this cluster, now at revision {}",
                r.records, r.source_revision, r.revision
            );
            println!(
                "the cluster is sealed under key set {}: {} of the operators ({}) each run `coffer operator unseal --key <their key> --share <their share file>`",
                r.cluster_id,
                r.threshold,
                r.operator_names.join(", ")
            );
            Ok(())
        }
    }
}

/// Runs an operator command (not `keygen`, which needs no cluster).
pub async fn run(op: OperatorCommand) -> Result<()> {
    match op {
        OperatorCommand::Keygen(_) => unreachable!("handled by the caller"),
        OperatorCommand::Snapshot { op } => snapshot_command(op).await,
        OperatorCommand::Init {
            operator_keys,
            threshold,
            admin_key,
            share_dir,
            client,
        } => {
            let target = client.target()?;
            let done = init(&target, &operator_keys, threshold, &admin_key, &share_dir).await?;
            println!(
                "initialized cluster {} ({threshold} of {} operators needed to unseal)",
                done.cluster_id,
                done.shares.len()
            );
            for (n, f) in &done.shares {
                println!("  share for {n}: {} (encrypted to {n}'s key)", f.display());
            }
            println!(
                "every node is sealed: {threshold} operators each run `coffer operator unseal --key <their key> --share <their share file>`"
            );
            Ok(())
        }
        OperatorCommand::PeerUnseal {
            setting,
            key,
            client,
        } => {
            let enabled = setting == "on";
            act(&client.target()?, &key, Action::PeerUnseal(enabled)).await?;
            println!(
                "peer unseal is {setting}: {}",
                if enabled {
                    "a restarted member is unsealed by an unsealed one"
                } else {
                    "a restarted member needs the ceremony again"
                }
            );
            Ok(())
        }
        OperatorCommand::Rekey {
            key,
            share,
            new_operator_keys,
            new_threshold,
            share_dir,
            client,
        } => {
            let target = client.target()?;
            match rekey(
                &target,
                &key,
                &share,
                &new_operator_keys,
                new_threshold,
                &share_dir,
            )
            .await?
            {
                RekeyReport::Pending {
                    threshold,
                    submitted,
                } => println!(
                    "rekey authorized by {} of {threshold} ({}); the other operators run the same command against the same node",
                    submitted.len(),
                    submitted.join(", ")
                ),
                RekeyReport::Done(done) => {
                    println!(
                        "rekeyed: key set {} ({new_threshold} of {} operators needed to unseal); the old share files no longer work",
                        done.cluster_id,
                        done.shares.len()
                    );
                    for (n, f) in &done.shares {
                        println!("  share for {n}: {} (encrypted to {n}'s key)", f.display());
                    }
                }
            }
            Ok(())
        }
        OperatorCommand::Seal {
            key: Some(key),
            client,
        } => {
            act(&client.target()?, &key, Action::Seal).await?;
            println!(
                "sealed: every node drops its keys as it applies the seal; unsealing takes the ceremony again"
            );
            Ok(())
        }
        OperatorCommand::Seal { key: None, client } => {
            let target = client.session_target().await?;
            coffer_api::v1::seal_client::SealClient::new(target.connect().await?)
                .emergency_seal(coffer_api::v1::EmergencySealRequest {})
                .await
                .map_err(crate::cli::status_error)?;
            println!(
                "sealed (administrator's emergency seal): every node drops its keys as it applies the seal; unsealing takes the operators' ceremony"
            );
            Ok(())
        }
        OperatorCommand::Rotate { key, client } => {
            let n = act(&client.target()?, &key, Action::Rotate).await?;
            println!(
                "data key {n} is active: new writes use it; values written under older keys stay readable"
            );
            Ok(())
        }
        OperatorCommand::Unseal { key, share, client } => {
            let target = client.target()?;
            let r = unseal(&target, &key, &share).await?;
            if r.sealed {
                println!(
                    "share accepted: {} of {} ({}); still sealed",
                    r.submitted.len(),
                    r.threshold,
                    r.submitted.join(", ")
                );
            } else {
                println!(
                    "share accepted: node {} is unsealed; the shares were passed to every member",
                    r.node_id
                );
            }
            Ok(())
        }
    }
}
