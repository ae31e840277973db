//! The cost of authorizing one request, with 1,000 policies, 10,000 identities holding 3 of
//! them each, and 100,000 live sessions (10 per identity), every one in the node's caches:
//!
//! * `hot`: the steady state: the session certificate found in the verified-certificate cache,
//!   the session's decision in the grant cache, and the path matched against its merged ACL;
//! * `decide`: what a request pays once after any login, session, identity or policy change
//!   dropped the grant cache: the session, identity and policy records read (here from an
//!   in-memory map instead of redb), decrypted, decoded, the policies parsed and merged;
//! * `certificate`: what the first request with a certificate pays: X.509 parsing and the
//!   Ed25519 signature check against the session CA.
//!
//! `cargo bench -p coffer-node --bench authorization`

use std::collections::HashMap;
use std::sync::Arc;

use coffer_node::auth::{self, Session};
use coffer_node::barrier::Keyring;
use coffer_node::identity::{self, Identity};
use coffer_node::keys::KeyPair;
use coffer_node::policy::{self, Capability};
use coffer_node::session::{self, SessionCa, Sessions};
use criterion::{Criterion, criterion_group, criterion_main};
use rustls::pki_types::CertificateDer;

const POLICIES: usize = 1_000;
const IDENTITIES: usize = 10_000;
const SESSIONS_EACH: usize = 10;
const NOW: u64 = 1_800_000_000_000;

struct World {
    ring: Keyring,
    ca: SessionCa,
    records: HashMap<Vec<u8>, Vec<u8>>,
    sessions: Vec<([u8; 32], CertificateDer<'static>, String)>,
}

fn put<T: serde::Serialize>(w: &mut World, key: Vec<u8>, record: &T) {
    let plain = postcard::to_allocvec(record).expect("encode");
    let sealed = w.ring.encrypt(&key, &plain).expect("encrypt");
    w.records.insert(key, sealed);
}

fn world() -> World {
    let ring = Keyring::new().expect("keyring");
    let ca = SessionCa::from_keyring(&ring).expect("ca");
    let mut w = World {
        ring,
        ca,
        records: HashMap::new(),
        sessions: Vec::new(),
    };
    for i in 0..POLICIES {
        let text = format!(
            "path \"secret/data/team-{i}/*\" {{ capabilities = [\"read\", \"list\"] }}\n\
             path \"secret/data/team-{i}/admin\" {{ capabilities = [\"deny\"] }}\n\
             path \"secret/data/shared/+/cfg-{i}\" {{ capabilities = [\"read\"] }}\n\
             path \"secret/metadata/team-{i}/*\" {{ capabilities = [\"list\"] }}\n\
             path \"secret/data/team-{i}/rw/*\" {{ capabilities = [\"create\", \"update\"] }}\n"
        );
        let key = policy::store_key(&format!("p{i}"));
        let sealed = w.ring.encrypt(&key, text.as_bytes()).expect("encrypt");
        w.records.insert(key, sealed);
    }
    // One identity key stands for all (the check compares stored bytes, not signatures).
    let identity_key = KeyPair::generate()
        .expect("key")
        .public()
        .to_bytes()
        .to_vec();
    let session_keys: Vec<[u8; 32]> = (0..SESSIONS_EACH)
        .map(|_| KeyPair::generate().expect("key").public().signing_key())
        .collect();
    for i in 0..IDENTITIES {
        let name = format!("svc-{i}");
        let record = Identity {
            public_key: identity_key.clone(),
            policies: (0..3)
                .map(|k| format!("p{}", (i * 7 + k * 331) % POLICIES))
                .collect(),
            default_ttl_s: None,
            max_ttl_s: None,
        };
        put(&mut w, identity::store_key(&name), &record);
        for (j, base) in session_keys.iter().enumerate() {
            // Distinct session keys without 100,000 key generations: vary the bytes (they are
            // certified, not used to sign, here).
            let mut key = *base;
            key[..4].copy_from_slice(&(i as u32).to_be_bytes());
            key[4] = j as u8;
            let session = Session {
                identity: name.clone(),
                identity_key: identity_key.clone(),
                session_key: [key.as_slice(), &[0u8; 32]].concat(),
                created_ms: NOW,
                expires_ms: NOW + 3_600_000,
                kubernetes: None,
            };
            put(
                &mut w,
                auth::session_key(&session::session_id(&key)),
                &session,
            );
            let pem = w.ca.issue(&key, &name, NOW, NOW + 3_600_000).expect("cert");
            let der = rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .expect("cert")
                .expect("pem");
            w.sessions.push((
                key,
                der,
                format!("secret/data/team-{}/db", (i * 7) % POLICIES),
            ));
        }
    }
    w
}

fn authorization(c: &mut Criterion) {
    let w = world();
    let read = |key: &[u8]| -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, String> {
        match w.records.get(key) {
            Some(v) => w.ring.decrypt(key, v).map(Some).map_err(|e| e.to_string()),
            None => Ok(None),
        }
    };
    let admin = || -> Result<Vec<u8>, String> { Ok(Vec::new()) };
    // No grants in this world: the prefix scan finds nothing.
    let list = |_: &[u8]| -> Result<Vec<zeroize::Zeroizing<Vec<u8>>>, String> { Ok(Vec::new()) };
    let caches = Sessions::default();
    for (key, cert, _) in &w.sessions {
        let grant = session::decide(&read, &list, &admin, key).expect("decide");
        caches.verify(&w.ca, cert, NOW).expect("verify");
        caches.keep(1, *key, Arc::new(grant));
    }
    assert_eq!(w.sessions.len(), IDENTITIES * SESSIONS_EACH);
    let with_cert = &w.sessions;
    let mut group = c.benchmark_group("authorize");
    let mut i = 0usize;
    group.bench_function("hot", |b| {
        b.iter(|| {
            i = (i + 7919) % with_cert.len();
            let (_, cert, path) = &with_cert[i];
            let key = caches.verify(&w.ca, cert, NOW).expect("cached");
            let grant = caches.grant(1, &key).expect("cached");
            assert!(grant.acl.allows(path, Capability::Read));
        })
    });
    group.bench_function("decide", |b| {
        b.iter(|| {
            i = (i + 7919) % w.sessions.len();
            session::decide(&read, &list, &admin, &w.sessions[i].0).expect("decide")
        })
    });
    group.bench_function("certificate", |b| {
        b.iter(|| {
            i = (i + 7919) % with_cert.len();
            w.ca.verify(&with_cert[i].1, NOW).expect("verify")
        })
    });
    group.finish();
}

criterion_group!(benches, authorization);
criterion_main!(benches);
