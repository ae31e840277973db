//! Connecting to a cluster from the CLI and the bench: TLS with the cluster CA, any node.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coffer_api::v1::cluster_client::ClusterClient;
use coffer_api::v1::kv_client::KvClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Where and how to reach the cluster.
#[derive(Debug, Clone)]
pub struct Target {
    /// API addresses (`host:port`), tried in order.
    pub addrs: Vec<String>,
    /// The cluster CA (PEM).
    pub ca_pem: Vec<u8>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Target {
    /// From the `--addr` list and the CA file.
    pub fn new(addrs: &[String], ca: Option<&Path>, timeout: Duration) -> Result<Target> {
        let addrs: Vec<String> = addrs
            .iter()
            .flat_map(|a| a.split(','))
            .map(|a| a.trim().trim_start_matches("https://").to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            bail!(
                "no server address: pass --addr HOST:PORT or set COFFER_ADDR (`source <dev dir>/env` after `coffer dev`)"
            );
        }
        let ca = ca.context(
            "no CA certificate: pass --ca-cert FILE or set COFFER_CACERT (Coffer speaks TLS only)",
        )?;
        let ca_pem = std::fs::read(ca)
            .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
        Ok(Target {
            addrs,
            ca_pem,
            timeout,
        })
    }

    /// A lazily connecting channel to one address.
    pub fn channel_to(&self, addr: &str) -> Result<Channel> {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        Ok(Endpoint::from_shared(format!("https://{addr}"))
            .with_context(|| format!("bad server address {addr:?}"))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(self.timeout)
            .tcp_nodelay(true)
            .connect_lazy())
    }

    /// A connected channel to the first address that answers.
    pub async fn connect(&self) -> Result<Channel> {
        let mut errors = Vec::new();
        for addr in &self.addrs {
            let channel = self.channel_to(addr)?;
            let mut probe = ClusterClient::new(channel.clone());
            match probe.status(coffer_api::v1::StatusRequest::default()).await {
                Ok(_) => return Ok(channel),
                Err(e) => errors.push(format!("{addr}: {}", e.message())),
            }
        }
        bail!("no node answered: {}", errors.join("; "))
    }

    /// A key/value client on the first node that answers.
    pub async fn kv(&self) -> Result<KvClient<Channel>> {
        Ok(KvClient::new(self.connect().await?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// A cluster client on the first node that answers.
    pub async fn cluster(&self) -> Result<ClusterClient<Channel>> {
        Ok(ClusterClient::new(self.connect().await?))
    }
}
