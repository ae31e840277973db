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
use crate::seal::{SHARE_INFO, ShareFile, peer_unseal_message, unseal_message};
use crate::threshold;

fn hex(bytes: &[u8]) -> String {
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

/// Initializes the cluster at `target` and writes one share file per operator into
/// `share_dir` (never overwriting one).
pub async fn init(
    target: &Target,
    operator_keys: &[PathBuf],
    threshold: u32,
    admin_key: &Path,
    share_dir: &Path,
) -> Result<InitReport> {
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
    let admin = PublicKey::load(admin_key)?;
    std::fs::create_dir_all(share_dir)
        .with_context(|| format!("cannot create {}", share_dir.display()))?;
    let files: Vec<PathBuf> = names
        .iter()
        .map(|n| share_dir.join(format!("{n}.share")))
        .collect();
    if let Some(f) = files.iter().find(|f| f.exists()) {
        bail!(
            "{} already exists: move old share files away before init (they are never overwritten)",
            f.display()
        );
    }
    let mut seal = SealClient::new(target.connect().await?);
    let done = seal
        .init(pb::InitRequest {
            operator_keys: keys.clone(),
            operator_names: names.clone(),
            threshold,
            admin_key: admin.to_bytes().to_vec(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    for (i, file) in files.iter().enumerate() {
        let share = ShareFile {
            cluster_id: done.cluster_id.clone(),
            operator_index: i as u32,
            operator_fingerprint: PublicKey::from_bytes(&keys[i])?.fingerprint(),
            threshold,
            encrypted_share: hex(&done.encrypted_shares[i]),
        };
        crate::tls::write_private(file, &serde_json::to_string_pretty(&share)?)?;
    }
    Ok(InitReport {
        cluster_id: done.cluster_id,
        shares: names.into_iter().zip(files).collect(),
    })
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

/// Opens `share` with `key`, computes and signs a decryption share here, and submits it to
/// the node at `target`.
pub async fn unseal(target: &Target, key: &Path, share: &Path) -> Result<UnsealReport> {
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
    let mut seal = SealClient::new(target.connect().await?);
    let status = initialized_status(&mut seal).await?;
    if status.cluster_id != file.cluster_id {
        bail!(
            "{} is for cluster {}, but this cluster is {}",
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
    let decryption = threshold::decryption_share(&secret, &status.master_ciphertext)?;
    let signature = pair.sign(&unseal_message(
        &file.cluster_id,
        &status.master_ciphertext,
        file.operator_index,
        &decryption,
    ));
    let answer = seal
        .unseal(pb::UnsealRequest {
            cluster_id: file.cluster_id,
            operator_index: file.operator_index,
            decryption_share: decryption,
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

/// Signs and sends the peer-unseal setting with the operator key `key`.
pub async fn set_peer_unseal(target: &Target, key: &Path, enabled: bool) -> Result<()> {
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
    let signature = pair.sign(&peer_unseal_message(
        &status.cluster_id,
        enabled,
        status.peer_unseal_revision,
    ));
    seal.set_peer_unseal(pb::PeerUnsealRequest {
        enabled,
        operator_index: index as u32,
        revision: status.peer_unseal_revision,
        signature: signature.to_vec(),
    })
    .await
    .map_err(status_error)?;
    Ok(())
}

/// Runs an operator command (not `keygen`, which needs no cluster).
pub async fn run(op: OperatorCommand) -> Result<()> {
    match op {
        OperatorCommand::Keygen(_) => unreachable!("handled by the caller"),
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
            set_peer_unseal(&client.target()?, &key, enabled).await?;
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
