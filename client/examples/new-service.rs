//! A new service with working auth in a few lines: connect with an identity key or a
//! Kubernetes role, write a secret, read it back.
//!
//! ```sh
//! COFFER_ADDR=127.0.0.1:7700 COFFER_CACERT=/tmp/coffer/ca.pem COFFER_KEY=web.key \
//!     cargo run -p coffer-client --example new-service
//! ```
//!
//! In a pod, set COFFER_KUBERNETES_ROLE (and COFFER_TOKEN_FILE if the token is not at the
//! default path) instead of COFFER_KEY.

use coffer_client::{Client, Config, Login, keys::KeyPair};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let var = |name: &str| std::env::var(name).map_err(|_| format!("set {name}"));
    let login = match std::env::var("COFFER_KUBERNETES_ROLE") {
        Ok(role) => Login::Kubernetes {
            role,
            token_file: std::env::var("COFFER_TOKEN_FILE")
                .unwrap_or_else(|_| coffer_client::KUBERNETES_TOKEN_FILE.into())
                .into(),
        },
        Err(_) => Login::Key(KeyPair::load(var("COFFER_KEY")?.as_ref())?),
    };
    let ca = std::fs::read(var("COFFER_CACERT")?)?;
    let client = Client::connect(Config::new(var("COFFER_ADDR")?.split(','), ca, login)).await?;

    let kv = client.kv("secret");
    let written = kv
        .put("example/db", [("user", "app"), ("password", "s3cret")])
        .await?;
    let secret = kv.get("example/db").await?;
    println!("secret/example/db version {}:", written.version);
    for (field, value) in secret.data.iter() {
        println!("  {field}={value}");
    }
    Ok(())
}
