//! `coffer kv`, `coffer secrets`, `coffer wrap` and `coffer unwrap`: the kv and wrap engines,
//! through the client SDK. Paths start with the mount, Vault style: `secret/app/db` is the
//! secret `app/db` in the mount `secret`.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use coffer_client::keys::{KeyPair, PublicKey};
use coffer_client::kv::{MetadataUpdate, MountOptions, Patch, ReadOptions, Secret, VersionInfo};
use coffer_client::{Client, Config, Login};
use serde_json::json;

use crate::cli::{ClientArgs, Format, print_names, print_table};
use crate::client::StoredSession;

/// `coffer kv` operations on the kv engine.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Writes a new version of a secret: `coffer kv put secret/app/db user=app pass=@pass.txt`,
    /// or `-` to read KEY=VALUE lines or a JSON object from standard input.
    Put {
        /// MOUNT/PATH, e.g. secret/app/db.
        path: String,
        /// Fields: KEY=VALUE, KEY=@FILE (the file's contents), or - (standard input).
        #[arg(required = true)]
        fields: Vec<String>,
        /// Write only if the current version is N (0: only if the secret has none).
        #[arg(long)]
        cas: Option<u64>,
    },
    /// Reads a secret (the latest version unless --version).
    // `--version` here is the secret's version, not the program's.
    #[command(disable_version_flag = true)]
    Get {
        /// MOUNT/PATH.
        path: String,
        /// The version to read.
        #[arg(long)]
        version: Option<u64>,
        /// Print only this field's value, raw (for scripts).
        #[arg(long)]
        field: Option<String>,
        /// Serve from the contacted node's state without asking the leader (may lag).
        #[arg(long)]
        stale: bool,
        /// Have the server encrypt the data to your identity key (needs --identity-key or
        /// COFFER_KEY): only you can read it, past any TLS-terminating proxy.
        #[arg(long)]
        sealed: bool,
    },
    /// Changes some fields of the latest version, making a new version.
    Patch {
        /// MOUNT/PATH.
        path: String,
        /// Fields to set: KEY=VALUE, KEY=@FILE, or -.
        fields: Vec<String>,
        /// A field to remove; repeat for more.
        #[arg(long = "remove")]
        remove: Vec<String>,
        /// Check-and-set against version N instead of the one the server reads.
        #[arg(long)]
        cas: Option<u64>,
    },
    /// Soft-deletes versions (the latest when none is given); `undelete` brings them back.
    Delete {
        /// MOUNT/PATH.
        path: String,
        /// Versions, comma-separated.
        #[arg(long, value_delimiter = ',')]
        versions: Vec<u64>,
    },
    /// Restores soft-deleted versions.
    Undelete {
        /// MOUNT/PATH.
        path: String,
        /// Versions, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    /// Removes the data of versions for good.
    Destroy {
        /// MOUNT/PATH.
        path: String,
        /// Versions, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    /// A secret's metadata and settings.
    Metadata {
        /// Which operation.
        #[command(subcommand)]
        op: MetadataCommand,
    },
    /// Lists the names directly under a folder: `coffer kv list secret/app/`.
    List {
        /// MOUNT/ or MOUNT/FOLDER/.
        path: String,
    },
}

/// `coffer kv metadata` operations.
#[derive(Debug, Subcommand)]
pub enum MetadataCommand {
    /// Shows a secret's metadata and the state of each kept version.
    Get {
        /// MOUNT/PATH.
        path: String,
    },
    /// Changes a secret's settings (settings not given are left as they are).
    Put {
        /// MOUNT/PATH.
        path: String,
        /// Versions kept (0: the mount's setting).
        #[arg(long)]
        max_versions: Option<u32>,
        /// Every write must give --cas (`--cas-required=false` to turn it off).
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        cas_required: Option<bool>,
        /// Versions expire this long after they are written (e.g. 30d; 0s: never).
        #[arg(long, value_parser = parse_duration)]
        delete_version_after: Option<Duration>,
        /// Custom metadata KEY=VALUE; repeat for more. Replaces all custom metadata.
        #[arg(long = "custom")]
        custom: Vec<String>,
    },
    /// Removes a secret: its metadata and every version.
    Delete {
        /// MOUNT/PATH.
        path: String,
    },
}

/// `coffer secrets` operations: secrets engine mounts.
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Enables a secrets engine at a mount: `coffer secrets enable kv --path team-a`.
    Enable {
        /// The engine (only `kv`).
        #[arg(value_parser = ["kv"])]
        engine: String,
        /// The mount name: letters, digits, `-` and `_`.
        #[arg(long)]
        path: String,
        /// Versions kept per secret unless the secret says otherwise (0: 10).
        #[arg(long, default_value_t = 0)]
        max_versions: u32,
        /// Every write must give --cas.
        #[arg(long)]
        cas_required: bool,
        /// Versions expire this long after they are written (e.g. 30d).
        #[arg(long, value_parser = parse_duration)]
        delete_version_after: Option<Duration>,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Disables a mount and removes every secret in it.
    Disable {
        /// The mount name.
        name: String,
    },
    /// Lists the mounts.
    List,
}

/// `coffer wrap` options.
#[derive(Debug, Args)]
pub struct WrapArgs {
    /// The recipient's public key file (NAME.pub); it must belong to an identity.
    #[arg(long = "to")]
    pub recipient: PathBuf,
    /// How long the recipient has to unwrap it (1s to 30d).
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub ttl: Duration,
    /// Wrap this file's raw bytes.
    #[arg(long, conflicts_with = "fields")]
    pub file: Option<PathBuf>,
    /// Or fields, wrapped as a JSON object: KEY=VALUE, KEY=@FILE, or -.
    pub fields: Vec<String>,
}

// ---- parsing ----------------------------------------------------------------------------

/// Splits `MOUNT/PATH` into the mount and the path inside it.
pub(crate) fn split_path(arg: &str) -> Result<(String, String)> {
    match arg.trim_start_matches('/').split_once('/') {
        Some((mount, path)) if !mount.is_empty() && !path.trim_matches('/').is_empty() => {
            Ok((mount.to_string(), path.trim_end_matches('/').to_string()))
        }
        _ => bail!(
            "expected MOUNT/PATH such as secret/app/db (the mount is the first segment), got {arg:?}"
        ),
    }
}

/// Splits `MOUNT/` or `MOUNT/FOLDER/` into the mount and the folder to list (`""` or ending in
/// `/`).
pub(crate) fn split_folder(arg: &str) -> Result<(String, String)> {
    let arg_trimmed = arg.trim_start_matches('/');
    let (mount, folder) = arg_trimmed.split_once('/').unwrap_or((arg_trimmed, ""));
    if mount.is_empty() {
        bail!("expected MOUNT/ or MOUNT/FOLDER/ such as secret/app/, got {arg:?}");
    }
    let folder = folder.trim_end_matches('/');
    let folder = if folder.is_empty() {
        String::new()
    } else {
        format!("{folder}/")
    };
    Ok((mount.to_string(), folder))
}

/// `30s`, `10m`, `1h`, `7d`, `500ms`; a bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("expected a duration such as 30s, 10m, 1h or 7d, got {s:?}");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms_per = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

/// Fields from `KEY=VALUE`, `KEY=@FILE` and `-` (KEY=VALUE lines or a JSON object read from
/// `stdin`); a later field replaces an earlier one of the same name.
pub(crate) fn parse_fields(
    args: &[String],
    stdin: &mut dyn Read,
) -> Result<BTreeMap<String, String>> {
    let mut fields = BTreeMap::new();
    for arg in args {
        if arg == "-" {
            let mut text = zeroize::Zeroizing::new(String::new());
            stdin
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            fields.extend(parse_stdin(&text)?);
            continue;
        }
        let Some((key, value)) = arg.split_once('=') else {
            bail!("expected KEY=VALUE, KEY=@FILE or - (standard input), got {arg:?}");
        };
        if key.is_empty() {
            // The value may be a secret: it is not repeated.
            bail!("a field has no name: expected KEY=VALUE, got \"=...\"");
        }
        let value = match value.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {file} for the field {key}"))?,
            None => value.to_string(),
        };
        fields.insert(key.to_string(), value);
    }
    Ok(fields)
}

fn parse_stdin(text: &str) -> Result<BTreeMap<String, String>> {
    if text.trim_start().starts_with('{') {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| {
                anyhow::anyhow!(
                    "standard input is not a JSON object of fields (line {}, column {})",
                    e.line(),
                    e.column()
                )
            })?;
        return Ok(object
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect());
    }
    let mut fields = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                fields.insert(k.trim().to_string(), v.to_string());
            }
            // The line may hold a secret: name it by its number only.
            _ => bail!(
                "line {} of standard input: expected KEY=VALUE (or give a JSON object)",
                i + 1
            ),
        }
    }
    Ok(fields)
}

// ---- connecting -------------------------------------------------------------------------

/// An SDK client for these commands: with the identity key (`--identity-key`, COFFER_KEY) it
/// logs in with the key (starting from the stored session when that is the key's, storing a
/// new one otherwise); without one it uses the stored session from `coffer login`. `needs_key`
/// names an operation that decrypts with the key, which then must be given.
pub(crate) async fn connect(args: &ClientArgs, needs_key: Option<&str>) -> Result<Client> {
    let target = args.target()?;
    let key = match &args.identity_key {
        Some(path) => Some(KeyPair::load(path)?),
        None => None,
    };
    if let (None, Some(what)) = (&key, needs_key) {
        bail!(
            "{what} decrypts with your identity's private key: pass --identity-key FILE or set COFFER_KEY"
        );
    }
    let fingerprint = key.as_ref().map(|k| k.public().fingerprint());
    let stored = StoredSession::path()
        .and_then(|p| {
            StoredSession::load(&p)
                .map_err(|e| tracing::debug!(error = %e, "no usable stored session"))
                .ok()
        })
        .and_then(|s| s.fits(&target, fingerprint.as_deref()));
    let had_session = stored.is_some();
    let (login, initial_session) = match (key, stored) {
        (Some(key), stored) => (Login::Key(key), stored),
        (None, Some(session)) => (Login::Session(session), None),
        (None, None) => bail!(
            "not logged in: run `coffer login --key FILE`, or pass --identity-key FILE (or set COFFER_KEY)"
        ),
    };
    let mut config = Config::new(target.addrs.clone(), target.ca_pem.clone(), login);
    config.timeout = target.timeout;
    config.initial_session = initial_session;
    let client = Client::connect(config).await?;
    if let (false, Some(owner)) = (had_session, fingerprint) {
        StoredSession::save_best_effort(&target, &client.session(), &owner);
    }
    Ok(client)
}

// ---- running ----------------------------------------------------------------------------

fn version_json(v: &VersionInfo) -> serde_json::Value {
    json!({"version": v.version, "created_ms": v.created_ms, "deleted_ms": v.deleted_ms,
        "destroyed": v.destroyed})
}

fn print_written(mount: &str, path: &str, v: &VersionInfo, json: bool) {
    if json {
        println!(
            "{}",
            json!({"mount": mount, "path": path, "version": version_json(v)})
        );
    } else {
        println!("wrote {mount}/{path} (version {})", v.version);
    }
}

fn print_secret(mount: &str, path: &str, s: &Secret, json: bool) {
    if json {
        let data: BTreeMap<&str, &str> = s.data.iter().collect();
        println!(
            "{}",
            json!({"mount": mount, "path": path, "data": data, "version": version_json(&s.version),
                "custom_metadata": s.custom_metadata})
        );
        return;
    }
    println!("== {mount}/{path} (version {}) ==", s.version.version);
    let mut rows = vec![vec!["Key".to_string(), "Value".to_string()]];
    rows.extend(
        s.data
            .iter()
            .map(|(k, v)| vec![k.to_string(), v.to_string()]),
    );
    print_table(&rows);
}

fn print_changed(what: &str, mount: &str, path: &str, changed: &[u64], json: bool) {
    if json {
        println!(
            "{}",
            json!({"mount": mount, "path": path, "changed": changed})
        );
    } else if changed.is_empty() {
        println!("no version of {mount}/{path} changed (already {what})");
    } else {
        let list: Vec<String> = changed.iter().map(u64::to_string).collect();
        println!("{what} {mount}/{path} version(s) {}", list.join(", "));
    }
}

fn print_metadata(mount: &str, m: &coffer_client::kv::Metadata, json: bool) {
    if json {
        let versions: Vec<_> = m.versions.iter().map(version_json).collect();
        println!(
            "{}",
            json!({"mount": mount, "path": m.path, "created_ms": m.created_ms,
                "updated_ms": m.updated_ms, "current_version": m.current_version,
                "oldest_version": m.oldest_version, "max_versions": m.max_versions,
                "effective_max_versions": m.effective_max_versions,
                "cas_required": m.cas_required,
                "delete_version_after_ms": m.delete_version_after_ms,
                "custom_metadata": m.custom_metadata, "versions": versions})
        );
        return;
    }
    println!("== {mount}/{} ==", m.path);
    let custom: BTreeMap<_, _> = m.custom_metadata.iter().collect();
    let custom: Vec<String> = custom.iter().map(|(k, v)| format!("{k}={v}")).collect();
    print_table(&[
        vec!["current_version".into(), m.current_version.to_string()],
        vec!["oldest_version".into(), m.oldest_version.to_string()],
        vec![
            "max_versions".into(),
            format!(
                "{} (effective {})",
                m.max_versions, m.effective_max_versions
            ),
        ],
        vec!["cas_required".into(), m.cas_required.to_string()],
        vec![
            "delete_version_after".into(),
            format!("{} s", m.delete_version_after_ms / 1000),
        ],
        vec!["custom_metadata".into(), custom.join(", ")],
        vec!["created_ms".into(), m.created_ms.to_string()],
        vec!["updated_ms".into(), m.updated_ms.to_string()],
    ]);
    println!();
    let mut rows = vec![vec![
        "Version".to_string(),
        "Created (ms)".to_string(),
        "State".to_string(),
    ]];
    for v in &m.versions {
        let state = if v.destroyed {
            "destroyed".to_string()
        } else if v.deleted_ms != 0 {
            format!("deleted at {}", v.deleted_ms)
        } else {
            "live".to_string()
        };
        rows.push(vec![v.version.to_string(), v.created_ms.to_string(), state]);
    }
    print_table(&rows);
}

fn stdin() -> std::io::Stdin {
    std::io::stdin()
}

/// Runs `coffer kv ...`.
pub async fn kv_command(op: KvCommand, args: &ClientArgs) -> Result<()> {
    let json = args.format == Format::Json;
    let needs_key = matches!(op, KvCommand::Get { sealed: true, .. }).then_some("--sealed");
    // Parse everything before connecting: a usage mistake costs no login.
    match op {
        KvCommand::Put { path, fields, cas } => {
            let (mount, path) = split_path(&path)?;
            let data = parse_fields(&fields, &mut stdin())?;
            let kv = connect(args, needs_key).await?.kv(&mount);
            let v = match cas {
                Some(cas) => kv.put_cas(&path, data, cas).await?,
                None => kv.put(&path, data).await?,
            };
            print_written(&mount, &path, &v, json);
        }
        KvCommand::Get {
            path,
            version,
            field,
            stale,
            sealed,
        } => {
            let (mount, path) = split_path(&path)?;
            let kv = connect(args, needs_key).await?.kv(&mount);
            let options = ReadOptions {
                version: version.unwrap_or(0),
                stale,
            };
            let secret = if sealed {
                kv.get_sealed_with(&path, options).await?
            } else {
                kv.get_with(&path, options).await?
            };
            match field {
                Some(f) => {
                    let value = secret
                        .data
                        .get(&f)
                        .with_context(|| format!("{mount}/{path} has no field {f:?}"))?;
                    println!("{value}");
                }
                None => print_secret(&mount, &path, &secret, json),
            }
        }
        KvCommand::Patch {
            path,
            fields,
            remove,
            cas,
        } => {
            let (mount, path) = split_path(&path)?;
            if fields.is_empty() && remove.is_empty() {
                bail!("nothing to change: give KEY=VALUE fields to set or --remove KEY");
            }
            let set = parse_fields(&fields, &mut stdin())?;
            let kv = connect(args, needs_key).await?.kv(&mount);
            let patch = Patch {
                set: set.into(),
                remove,
                cas,
            };
            let v = kv.patch(&path, patch).await?;
            print_written(&mount, &path, &v, json);
        }
        KvCommand::Delete { path, versions } => {
            let (mount, path) = split_path(&path)?;
            let kv = connect(args, needs_key).await?.kv(&mount);
            let changed = kv.delete(&path, &versions).await?;
            print_changed("deleted", &mount, &path, &changed, json);
        }
        KvCommand::Undelete { path, versions } => {
            let (mount, path) = split_path(&path)?;
            let kv = connect(args, needs_key).await?.kv(&mount);
            let changed = kv.undelete(&path, &versions).await?;
            print_changed("undeleted", &mount, &path, &changed, json);
        }
        KvCommand::Destroy { path, versions } => {
            let (mount, path) = split_path(&path)?;
            let kv = connect(args, needs_key).await?.kv(&mount);
            let changed = kv.destroy(&path, &versions).await?;
            print_changed("destroyed", &mount, &path, &changed, json);
        }
        KvCommand::Metadata { op } => metadata_command(op, args, json).await?,
        KvCommand::List { path } => {
            let (mount, folder) = split_folder(&path)?;
            let kv = connect(args, needs_key).await?.kv(&mount);
            let names = kv.list(&folder).await?;
            print_names(&names, json);
        }
    }
    Ok(())
}

async fn metadata_command(op: MetadataCommand, args: &ClientArgs, json: bool) -> Result<()> {
    match op {
        MetadataCommand::Get { path } => {
            let (mount, path) = split_path(&path)?;
            let kv = connect(args, None).await?.kv(&mount);
            let m = kv.read_metadata(&path).await?;
            print_metadata(&mount, &m, json);
        }
        MetadataCommand::Put {
            path,
            max_versions,
            cas_required,
            delete_version_after,
            custom,
        } => {
            let (mount, path) = split_path(&path)?;
            let custom_metadata = if custom.is_empty() {
                None
            } else {
                let mut map = HashMap::new();
                for c in &custom {
                    let (k, v) = c
                        .split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .with_context(|| format!("expected --custom KEY=VALUE, got {c:?}"))?;
                    map.insert(k.to_string(), v.to_string());
                }
                Some(map)
            };
            let update = MetadataUpdate {
                max_versions,
                cas_required,
                delete_version_after,
                custom_metadata,
            };
            if update == MetadataUpdate::default() {
                bail!(
                    "nothing to change: give --max-versions, --cas-required, --delete-version-after or --custom"
                );
            }
            let kv = connect(args, None).await?.kv(&mount);
            let m = kv.write_metadata(&path, update).await?;
            print_metadata(&mount, &m, json);
        }
        MetadataCommand::Delete { path } => {
            let (mount, path) = split_path(&path)?;
            let kv = connect(args, None).await?.kv(&mount);
            if !kv.delete_metadata(&path).await? {
                bail!("no secret {mount}/{path}; nothing deleted");
            }
            if json {
                println!("{}", json!({"mount": mount, "path": path, "deleted": true}));
            } else {
                println!("deleted {mount}/{path} and every version");
            }
        }
    }
    Ok(())
}

/// Runs `coffer secrets ...`.
pub async fn secrets_command(op: SecretsCommand, args: &ClientArgs) -> Result<()> {
    let json = args.format == Format::Json;
    let mounts = connect(args, None).await?.mounts();
    match op {
        SecretsCommand::Enable {
            engine: _,
            path,
            max_versions,
            cas_required,
            delete_version_after,
            description,
        } => {
            let options = MountOptions {
                max_versions,
                cas_required,
                delete_version_after: delete_version_after.unwrap_or_default(),
                description,
            };
            let m = mounts.enable(&path, options).await?;
            if json {
                println!("{}", mount_json(&m));
            } else {
                println!("enabled the {} engine at {}/", m.r#type, m.path);
            }
        }
        SecretsCommand::Disable { name } => {
            let removed = mounts.disable(&name).await?;
            if json {
                println!("{}", json!({"path": name, "records_removed": removed}));
            } else {
                println!("disabled {name}/ ({removed} stored records removed)");
            }
        }
        SecretsCommand::List => {
            let list = mounts.list().await?;
            if json {
                let list: Vec<_> = list.iter().map(mount_json).collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                let mut rows = vec![vec![
                    "Path".to_string(),
                    "Type".to_string(),
                    "Max versions".to_string(),
                    "CAS required".to_string(),
                    "Description".to_string(),
                ]];
                for m in &list {
                    rows.push(vec![
                        format!("{}/", m.path),
                        m.r#type.clone(),
                        m.max_versions.to_string(),
                        m.cas_required.to_string(),
                        m.description.clone(),
                    ]);
                }
                print_table(&rows);
            }
        }
    }
    Ok(())
}

fn mount_json(m: &coffer_client::kv::MountInfo) -> serde_json::Value {
    json!({"path": m.path, "type": m.r#type, "max_versions": m.max_versions,
        "cas_required": m.cas_required, "delete_version_after_ms": m.delete_version_after_ms,
        "description": m.description, "builtin": m.builtin})
}

/// Runs `coffer wrap`: prints the wrap id for the recipient.
pub async fn wrap_command(w: WrapArgs, args: &ClientArgs) -> Result<()> {
    let recipient = PublicKey::load(&w.recipient)?;
    let payload = zeroize::Zeroizing::new(match &w.file {
        Some(file) => {
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
        }
        None => {
            if w.fields.is_empty() {
                bail!("nothing to wrap: give --file FILE or KEY=VALUE fields (or - for stdin)");
            }
            serde_json::to_vec(&parse_fields(&w.fields, &mut stdin())?)?
        }
    });
    let client = connect(args, None).await?;
    let wrapped = client.wrap().wrap(&recipient, &payload, w.ttl).await?;
    if args.format == Format::Json {
        println!(
            "{}",
            json!({"id": wrapped.id, "expires_ms": wrapped.expires_ms, "recipient": wrapped.recipient})
        );
    } else {
        println!("{}", wrapped.id);
    }
    Ok(())
}

/// Runs `coffer unwrap`: prints the payload raw, or writes it to `out` (mode 0600).
pub async fn unwrap_command(id: String, out: Option<PathBuf>, args: &ClientArgs) -> Result<()> {
    let client = connect(args, Some("unwrap")).await?;
    let unwrapped = client.wrap().unwrap(&id).await?;
    match out {
        Some(path) => write_private_bytes(&path, &unwrapped.payload)?,
        None => {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&unwrapped.payload)?;
            stdout.flush()?;
        }
    }
    Ok(())
}

fn write_private_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_start_with_the_mount() {
        assert_eq!(
            split_path("secret/app/db").expect("ok"),
            ("secret".into(), "app/db".into())
        );
        assert_eq!(
            split_path("/team-a/x/").expect("ok"),
            ("team-a".into(), "x".into())
        );
        for bad in ["secret", "secret/", "/app", ""] {
            let err = split_path(bad).expect_err(bad).to_string();
            assert!(err.contains("MOUNT/PATH"), "{err}");
        }
        assert_eq!(
            split_folder("secret/app").expect("ok"),
            ("secret".into(), "app/".into())
        );
        assert_eq!(
            split_folder("secret/").expect("ok"),
            ("secret".into(), String::new())
        );
        assert_eq!(
            split_folder("secret").expect("ok"),
            ("secret".into(), String::new())
        );
        assert!(split_folder("/").is_err());
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "m", "1w", "1.5h", "-1s", "99999999999999999d"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("30s, 10m, 1h or 7d"), "{err}");
        }
    }

    #[test]
    fn fields_come_from_arguments_files_and_standard_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pass.txt");
        std::fs::write(&file, "from-file\n").expect("write");
        let args = vec![
            "user=app".to_string(),
            format!("pass=@{}", file.display()),
            "url=a=b".to_string(),
            "-".to_string(),
        ];
        let mut stdin = "# comment\nhost=db\n\nuser=override\n".as_bytes();
        let fields = parse_fields(&args, &mut stdin).expect("parse");
        assert_eq!(fields["pass"], "from-file\n");
        assert_eq!(fields["url"], "a=b", "only the first = splits");
        assert_eq!(fields["host"], "db");
        assert_eq!(fields["user"], "override", "later fields win");

        let mut json = r#"{"a": "1", "n": 2}"#.as_bytes();
        let fields = parse_fields(&["-".to_string()], &mut json).expect("json");
        assert_eq!((fields["a"].as_str(), fields["n"].as_str()), ("1", "2"));
    }

    #[test]
    fn bad_fields_say_what_is_expected() {
        let err = parse_fields(&["x".to_string()], &mut "".as_bytes())
            .expect_err("no =")
            .to_string();
        assert_eq!(
            err,
            "expected KEY=VALUE, KEY=@FILE or - (standard input), got \"x\""
        );
        assert!(parse_fields(&["=v".to_string()], &mut "".as_bytes()).is_err());
        let err = parse_fields(&["-".to_string()], &mut "ok=1\nhunter2\n".as_bytes())
            .expect_err("bad line")
            .to_string();
        assert!(err.contains("line 2") && !err.contains("hunter2"), "{err}");
        let err = parse_fields(&["k=@/nonexistent/file".to_string()], &mut "".as_bytes())
            .expect_err("no file")
            .to_string();
        assert!(err.contains("/nonexistent/file"), "{err}");
    }
}

#[cfg(test)]
mod cli_tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("coffer").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kv_commands_parse_as_documented() {
        let cli = parse(&[
            "kv",
            "get",
            "secret/app/db",
            "--version",
            "3",
            "--field",
            "user",
            "--stale",
        ])
        .expect("get");
        let Command::Kv {
            op:
                KvCommand::Get {
                    version,
                    field,
                    stale,
                    sealed,
                    ..
                },
            ..
        } = cli.command
        else {
            panic!("not kv get");
        };
        assert_eq!(
            (version, field.as_deref(), stale, sealed),
            (Some(3), Some("user"), true, false)
        );

        let cli = parse(&["kv", "destroy", "secret/a", "--versions", "1,2"]).expect("destroy");
        let Command::Kv {
            op: KvCommand::Destroy { versions, .. },
            ..
        } = cli.command
        else {
            panic!("not kv destroy");
        };
        assert_eq!(versions, [1, 2]);
        assert!(
            parse(&["kv", "undelete", "secret/a"]).is_err(),
            "--versions is required"
        );

        let cli = parse(&[
            "kv",
            "metadata",
            "put",
            "secret/a",
            "--cas-required",
            "--delete-version-after",
            "1h",
        ])
        .expect("metadata put");
        let Command::Kv {
            op:
                KvCommand::Metadata {
                    op:
                        MetadataCommand::Put {
                            cas_required,
                            delete_version_after,
                            ..
                        },
                },
            ..
        } = cli.command
        else {
            panic!("not kv metadata put");
        };
        assert_eq!(cas_required, Some(true));
        assert_eq!(delete_version_after, Some(Duration::from_secs(3600)));
        let cli =
            parse(&["kv", "metadata", "put", "secret/a", "--cas-required=false"]).expect("cas off");
        assert!(matches!(
            cli.command,
            Command::Kv {
                op: KvCommand::Metadata {
                    op: MetadataCommand::Put {
                        cas_required: Some(false),
                        ..
                    }
                },
                ..
            }
        ));
    }

    #[test]
    fn wrap_takes_a_file_or_fields_but_not_both() {
        let cli = parse(&["wrap", "--to", "bob.pub", "--ttl", "1h", "a=1"]).expect("wrap");
        let Command::Wrap { wrap, .. } = cli.command else {
            panic!("not wrap");
        };
        assert_eq!(wrap.ttl, Duration::from_secs(3600));
        assert_eq!(wrap.fields, ["a=1"]);
        assert!(parse(&["wrap", "--to", "b.pub", "--file", "f", "a=1"]).is_err());
        let err = parse(&["wrap", "--to", "b.pub", "--ttl", "soon"]).expect_err("bad ttl");
        assert!(err.to_string().contains("30s, 10m, 1h or 7d"), "{err}");
        assert!(parse(&["secrets", "enable", "kv", "--path", "team-a"]).is_ok());
        assert!(parse(&["secrets", "enable", "pki", "--path", "x"]).is_err());
    }
}
