//! The Kubernetes manifests in `deploy/kubernetes/` are never applied where Coffer is built
//! (there is no cluster), so this test is what keeps them applicable. It renders the base and
//! each overlay with `kubectl kustomize`, and for every object:
//!
//! * picks the Kubernetes API type by `apiVersion` and `kind` (an unexpected kind fails),
//!   deserializes it into the `k8s-openapi` type and serializes it back: the two must be equal,
//!   so a misspelt or unknown field, which serde would silently drop, fails;
//! * checks Coffer's rules: the replica count of the overlay, a disruption budget of
//!   floor((n-1)/2), required anti-affinity on the host name, parallel pod management, a
//!   headless peer service that publishes pods before they are ready, the three probes, no
//!   privileged or root container and a read-only root filesystem, one ReadWriteOnce volume
//!   at `/var/lib/coffer`, the `system:auth-delegator` binding, one initial member per pod;
//! * checks that every `--flag`, `COFFER_*` variable and config file key the pods use is one
//!   `coffer server --help` (the program under test) prints.
//!
//! The checker is run against deliberately broken manifests at the end of this file, so it
//! provably can fail.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use common::must_render;

const NAMESPACE: &str = "coffer";
const APP_LABEL_KEY: &str = "app.kubernetes.io/name";
const APP_LABEL_VALUE: &str = "coffer";
/// Where each pod's data volume is mounted (the chaos-mesh IOChaos expects it there too).
const DATA_VOLUME: &str = "/var/lib/coffer";
const PEER_DOMAIN: &str = "coffer-peers.coffer.svc.cluster.local";

/// What is rendered, and how many nodes it must run.
const RENDERED: &[(&str, usize)] = &[
    ("base", 3),
    ("overlays/three-nodes", 3),
    ("overlays/five-nodes", 5),
];

/// One rendered object, as its Kubernetes API type.
// A rendering holds about ten objects, held once: the variants' sizes do not matter here.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    Service(Service),
    StatefulSet(StatefulSet),
    PodDisruptionBudget(PodDisruptionBudget),
    NetworkPolicy(NetworkPolicy),
}

/// `coffer server --help` of the program under test.
fn server_help() -> String {
    let out = Command::new(coffer_cluster_tests::coffer_bin())
        .args(["server", "--help"])
        .output()
        .expect("run coffer server --help");
    assert!(out.status.success(), "coffer server --help failed");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// Deserializes `doc` as `T` and requires that serializing it back gives `doc` again.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value, what: &str) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| format!("{what}: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{what}: {e}"))?;
    match first_difference("", doc, &back) {
        None => Ok(typed),
        Some(path) => Err(format!(
            "{what}: the field {path} is not part of the Kubernetes API type (misspelt, misplaced or of the wrong type)"
        )),
    }
}

/// The JSON pointer of the first place where the manifest `a` and its round trip `b` differ.
/// The only thing the round trip may add is `apiVersion` and `kind` on an embedded object that
/// is itself a resource (k8s-openapi writes them on every `PersistentVolumeClaim`, including
/// the StatefulSet's volume claim templates, where the manifest leaves them out).
fn first_difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let here = format!("{path}/{k}");
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => first_difference(&here, va, vb),
                    (None, Some(_)) if k == "apiVersion" || k == "kind" => None,
                    _ => Some(here),
                }
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(&format!("{path}/{i}"), va, vb)),
        _ if a == b => None,
        _ => Some(if path.is_empty() {
            "/".into()
        } else {
            path.into()
        }),
    }
}

fn typed(doc: &Value) -> Result<Object, String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or("(none)");
    let kind = doc["kind"].as_str().unwrap_or("(none)");
    let name = doc["metadata"]["name"].as_str().unwrap_or("(unnamed)");
    let what = format!("{kind} {name}");
    Ok(match (api_version, kind) {
        ("v1", "Namespace") => Object::Namespace(round_trip(doc, &what)?),
        ("v1", "ServiceAccount") => Object::ServiceAccount(round_trip(doc, &what)?),
        ("v1", "ConfigMap") => Object::ConfigMap(round_trip(doc, &what)?),
        ("v1", "Service") => Object::Service(round_trip(doc, &what)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(round_trip(doc, &what)?)
        }
        ("apps/v1", "StatefulSet") => Object::StatefulSet(round_trip(doc, &what)?),
        ("policy/v1", "PodDisruptionBudget") => {
            Object::PodDisruptionBudget(round_trip(doc, &what)?)
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => Object::NetworkPolicy(round_trip(doc, &what)?),
        _ => return Err(format!("{what}: unexpected kind {api_version}/{kind}")),
    })
}

/// Every problem found in one rendering meant to run `nodes` nodes; empty when it is right.
fn problems(docs: &[Value], nodes: usize, help: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let mut objects = Vec::new();
    for doc in docs {
        match typed(doc) {
            Ok(o) => objects.push(o),
            Err(e) => errors.push(e),
        }
        let cluster_scoped = matches!(
            doc["kind"].as_str(),
            Some("Namespace" | "ClusterRoleBinding")
        );
        if !cluster_scoped && doc["metadata"]["namespace"] != NAMESPACE {
            errors.push(format!(
                "{} {} is not in the namespace {NAMESPACE}",
                doc["kind"], doc["metadata"]["name"]
            ));
        }
    }
    if !errors.is_empty() {
        return errors;
    }
    check_rules(&objects, nodes, help, &mut errors);
    errors
}

fn app_labelled(labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(APP_LABEL_KEY))
        .map(String::as_str)
        == Some(APP_LABEL_VALUE)
}

fn check_rules(objects: &[Object], nodes: usize, help: &str, errors: &mut Vec<String>) {
    let mut error = |e: String| errors.push(e);
    let sets: Vec<&StatefulSet> = objects
        .iter()
        .filter_map(|o| match o {
            Object::StatefulSet(s) => Some(s),
            _ => None,
        })
        .collect();
    let [set] = sets.as_slice() else {
        error(format!("expected one StatefulSet, found {}", sets.len()));
        return;
    };
    let Some(spec) = &set.spec else {
        error("the StatefulSet has no spec".into());
        return;
    };
    if spec.replicas != Some(nodes as i32) {
        error(format!(
            "the StatefulSet runs {:?} replicas, expected {nodes}",
            spec.replicas
        ));
    }
    if spec.pod_management_policy.as_deref() != Some("Parallel") {
        error(
            "podManagementPolicy must be Parallel (a sealed pod must not hold the others back)"
                .into(),
        );
    }
    // Pod coffer-N is node N: the node id comes from the pod index, which must start at 1.
    if spec.ordinals.as_ref().and_then(|o| o.start) != Some(1) {
        error("ordinals.start must be 1 (node ids are positive and equal the pod index)".into());
    }
    if !app_labelled(spec.selector.match_labels.as_ref()) {
        error(format!(
            "the StatefulSet must select {APP_LABEL_KEY}={APP_LABEL_VALUE}"
        ));
    }
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    if !app_labelled(template_labels) {
        error(format!(
            "the pods must carry {APP_LABEL_KEY}={APP_LABEL_VALUE}"
        ));
    }

    // The headless peer service.
    let service_name = spec.service_name.as_deref().unwrap_or_default();
    let peers = objects.iter().find_map(|o| match o {
        Object::Service(s) if s.metadata.name.as_deref() == Some(service_name) => Some(s),
        _ => None,
    });
    match peers.and_then(|s| s.spec.as_ref()) {
        None => error(format!(
            "no Service {service_name:?} (the StatefulSet's serviceName)"
        )),
        Some(s) => {
            if s.cluster_ip.as_deref() != Some("None") {
                error("the peer service must be headless (clusterIP: None)".into());
            }
            if s.publish_not_ready_addresses != Some(true) {
                error("the peer service must set publishNotReadyAddresses: true".into());
            }
        }
    }
    if format!("{service_name}.{NAMESPACE}.svc.cluster.local") != PEER_DOMAIN {
        error(format!(
            "the peer service must be named so that pods are found under {PEER_DOMAIN}"
        ));
    }

    let Some(pod) = &spec.template.spec else {
        error("the StatefulSet has no pod spec".into());
        return;
    };
    // Anti-affinity: never two members on one host.
    let anti = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let spread = anti.is_some_and(|terms| {
        terms.iter().any(|t| {
            t.topology_key == "kubernetes.io/hostname"
                && app_labelled(
                    t.label_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.as_ref()),
                )
        })
    });
    if !spread {
        error(
            "required podAntiAffinity on kubernetes.io/hostname for the coffer pods is missing"
                .into(),
        );
    }
    let pod_non_root = pod
        .security_context
        .as_ref()
        .and_then(|c| c.run_as_non_root)
        == Some(true);
    if pod.host_network == Some(true) || pod.host_pid == Some(true) || pod.host_ipc == Some(true) {
        error("the pods must not share the host's network, PID or IPC namespace".into());
    }

    // Service account and the TokenReview permission.
    let account = pod.service_account_name.clone().unwrap_or_default();
    if !objects.iter().any(|o| {
        matches!(o, Object::ServiceAccount(a) if a.metadata.name.as_deref() == Some(account.as_str()))
    }) {
        error(format!("the pods' service account {account:?} is not defined"));
    }
    let delegated = objects.iter().any(|o| match o {
        Object::ClusterRoleBinding(b) => {
            b.role_ref.kind == "ClusterRole"
                && b.role_ref.name == "system:auth-delegator"
                && b.subjects.iter().flatten().any(|s| {
                    s.kind == "ServiceAccount"
                        && s.name == account
                        && s.namespace.as_deref() == Some(NAMESPACE)
                })
        }
        _ => false,
    });
    if !delegated {
        error(format!(
            "no ClusterRoleBinding gives {account:?} system:auth-delegator (TokenReview)"
        ));
    }

    // The data volume (and any other, e.g. backups): one ReadWriteOnce volume per pod each.
    let claims = spec.volume_claim_templates.as_deref().unwrap_or_default();
    for claim in claims {
        let modes = claim.spec.as_ref().and_then(|s| s.access_modes.clone());
        if modes != Some(vec!["ReadWriteOnce".to_string()]) {
            error(format!(
                "the volume {:?} must be ReadWriteOnce, not {modes:?}",
                claim.metadata.name
            ));
        }
    }
    let data = match claims
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("data"))
    {
        Some(claim) => claim.metadata.name.clone().unwrap_or_default(),
        None => {
            error("no volumeClaimTemplate named data".into());
            String::new()
        }
    };
    // Scheduled backups go to a volume of their own, not the root filesystem or the data.
    let snapshot_dir = config_value(objects, "snapshot_dir");

    let coffer = pod.containers.iter().find(|c| c.name == "coffer");
    if coffer.is_none() {
        error("no container named coffer".into());
    }
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        check_container(c, pod_non_root, &mut error);
    }
    if let Some(c) = coffer {
        let mounted = c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == data && m.mount_path == DATA_VOLUME);
        if !mounted {
            error(format!(
                "the data volume {data:?} is not mounted at {DATA_VOLUME}"
            ));
        }
        if let Some(dir) = &snapshot_dir {
            let on_a_claim = c.volume_mounts.iter().flatten().any(|m| {
                m.mount_path == *dir
                    && m.name != data
                    && claims
                        .iter()
                        .any(|cl| cl.metadata.name.as_deref() == Some(m.name.as_str()))
            });
            if !on_a_claim {
                error(format!(
                    "snapshot_dir {dir} is not the mount path of a volume claim of its own"
                ));
            }
        }
        for p in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
        {
            let port = p
                .http_get
                .as_ref()
                .map(|h| &h.port)
                .or(p.tcp_socket.as_ref().map(|t| &t.port));
            let known = match port {
                Some(IntOrString::String(name)) => c
                    .ports
                    .iter()
                    .flatten()
                    .any(|cp| cp.name.as_deref() == Some(name)),
                Some(IntOrString::Int(n)) => {
                    c.ports.iter().flatten().any(|cp| cp.container_port == *n)
                }
                None => false,
            };
            if !known {
                error(format!(
                    "a probe of the coffer container uses the port {port:?}, which the container does not declare"
                ));
            }
        }
        // The server's endpoints: readiness is `/ready` (unsealed and caught up); liveness
        // and startup are `/health`, which answers while sealed, so a sealed pod waiting for
        // its operators is never restarted.
        for (probe, what, path) in [
            (&c.liveness_probe, "liveness", "/health"),
            (&c.startup_probe, "startup", "/health"),
            (&c.readiness_probe, "readiness", "/ready"),
        ] {
            let used = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.as_deref());
            if used != Some(path) {
                error(format!(
                    "the {what} probe of the coffer container asks {used:?}; it must ask {path}"
                ));
            }
        }
        check_flags(c, objects, help, &mut error);
        check_initial_members(c, objects, nodes, &mut error);
    }

    // The disruption budget keeps a majority.
    let budgets: Vec<&PodDisruptionBudget> = objects
        .iter()
        .filter_map(|o| match o {
            Object::PodDisruptionBudget(b) => Some(b),
            _ => None,
        })
        .collect();
    let want = IntOrString::Int(((nodes - 1) / 2) as i32);
    match budgets.as_slice() {
        [b] => {
            let s = b.spec.as_ref();
            if s.and_then(|s| s.max_unavailable.as_ref()) != Some(&want) {
                error(format!(
                    "the PodDisruptionBudget's maxUnavailable is {:?}, expected {want:?} = floor(({nodes}-1)/2)",
                    s.and_then(|s| s.max_unavailable.as_ref())
                ));
            }
            if s.and_then(|s| s.min_available.as_ref()).is_some() {
                error("the PodDisruptionBudget must give maxUnavailable only".into());
            }
            if !app_labelled(
                s.and_then(|s| s.selector.as_ref())
                    .and_then(|s| s.match_labels.as_ref()),
            ) {
                error("the PodDisruptionBudget must select the coffer pods".into());
            }
        }
        _ => error(format!(
            "expected one PodDisruptionBudget, found {}",
            budgets.len()
        )),
    }
    let has_namespace = objects.iter().any(
        |o| matches!(o, Object::Namespace(n) if n.metadata.name.as_deref() == Some(NAMESPACE)),
    );
    if !has_namespace {
        error(format!("the Namespace {NAMESPACE} is not defined"));
    }
    let policed = objects.iter().any(|o| {
        matches!(o, Object::NetworkPolicy(p) if app_labelled(p.spec.as_ref().and_then(|s| s.pod_selector.as_ref()).and_then(|s| s.match_labels.as_ref())))
    });
    if !policed {
        error("no NetworkPolicy selects the coffer pods".into());
    }
}

/// The string value of `key` in a ConfigMap's `.toml` file, if set.
fn config_value(objects: &[Object], key: &str) -> Option<String> {
    objects.iter().find_map(|o| {
        let Object::ConfigMap(map) = o else {
            return None;
        };
        map.data.iter().flatten().find_map(|(file, text)| {
            if !file.ends_with(".toml") {
                return None;
            }
            text.lines().find_map(|line| {
                let (k, v) = line.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        })
    })
}

fn check_container(c: &Container, pod_non_root: bool, error: &mut impl FnMut(String)) {
    let name = &c.name;
    for (probe, what) in [
        (&c.liveness_probe, "liveness"),
        (&c.readiness_probe, "readiness"),
        (&c.startup_probe, "startup"),
    ] {
        if probe.is_none() {
            error(format!("the container {name} has no {what} probe"));
        }
    }
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged) == Some(true) {
        error(format!("the container {name} is privileged"));
    }
    if sc.and_then(|s| s.allow_privilege_escalation) != Some(false) {
        error(format!(
            "the container {name} must set allowPrivilegeEscalation: false"
        ));
    }
    if sc.and_then(|s| s.read_only_root_filesystem) != Some(true) {
        error(format!(
            "the container {name} must set readOnlyRootFilesystem: true"
        ));
    }
    let non_root = sc.and_then(|s| s.run_as_non_root).unwrap_or(pod_non_root);
    if !non_root || sc.and_then(|s| s.run_as_user) == Some(0) {
        error(format!("the container {name} must run as non-root"));
    }
    let drops_all = sc
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.drop.as_ref())
        .is_some_and(|d| d.iter().any(|x| x == "ALL"));
    let adds = sc
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.as_ref())
        .is_some_and(|a| !a.is_empty());
    if !drops_all || adds {
        error(format!(
            "the container {name} must drop ALL capabilities and add none"
        ));
    }
    let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
    if !requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")) {
        error(format!("the container {name} must request cpu and memory"));
    }
}

/// Every flag in the arguments, `COFFER_*` variable and config file key is one
/// `coffer server` knows.
fn check_flags(c: &Container, objects: &[Object], help: &str, error: &mut impl FnMut(String)) {
    let args = c.args.iter().flatten().chain(c.command.iter().flatten());
    if c.args
        .as_deref()
        .and_then(<[String]>::first)
        .map(String::as_str)
        != Some("server")
    {
        error("the coffer container must run `coffer server`".into());
    }
    let help_flags: BTreeSet<&str> = help
        .split(|ch: char| ch.is_whitespace() || ch == ',' || ch == '[' || ch == ']')
        .filter(|w| w.starts_with("--"))
        .collect();
    for arg in args {
        if let Some(flag) = arg.strip_prefix("--") {
            let flag = format!("--{}", flag.split('=').next().unwrap_or_default());
            if !help_flags.contains(flag.as_str()) {
                error(format!("{flag} is not a `coffer server` flag"));
            }
        }
    }
    for var in c.env.iter().flatten() {
        if var.name.starts_with("COFFER_") && !help.contains(&format!("[env: {}=", var.name)) {
            error(format!(
                "{} is not a `coffer server` environment variable",
                var.name
            ));
        }
    }
    // The config file keys are the flags in snake_case.
    for object in objects {
        let Object::ConfigMap(map) = object else {
            continue;
        };
        for (file, text) in map.data.iter().flatten() {
            if !file.ends_with(".toml") {
                continue;
            }
            for line in text.lines().map(str::trim) {
                if line.starts_with('#')
                    || line.is_empty()
                    || line.starts_with('"')
                    || line.starts_with(']')
                {
                    continue;
                }
                let key = line.split('=').next().unwrap_or_default().trim();
                let flag = format!("--{}", key.replace('_', "-"));
                let flag = if flag == "--initial-members" {
                    "--initial-member".into()
                } else {
                    flag
                };
                if !help_flags.contains(flag.as_str()) {
                    error(format!(
                        "the config file key {key:?} in {file} is not a `coffer server` option"
                    ));
                }
            }
        }
    }
}

/// The initial members (`COFFER_INITIAL_MEMBERS`, from a ConfigMap) are exactly the pods:
/// `N=coffer-N.PEERS:7001/coffer-N.PEERS:7000` for N in 1..=nodes, matching what each pod
/// advertises.
fn check_initial_members(
    c: &Container,
    objects: &[Object],
    nodes: usize,
    error: &mut impl FnMut(String),
) {
    let env = |name: &str| c.env.iter().flatten().find(|v| v.name == name);
    let Some(source) = env("COFFER_INITIAL_MEMBERS")
        .and_then(|v| v.value_from.as_ref())
        .and_then(|f| f.config_map_key_ref.as_ref())
    else {
        error("COFFER_INITIAL_MEMBERS must come from a ConfigMap".into());
        return;
    };
    let list = objects.iter().find_map(|o| match o {
        Object::ConfigMap(m) if m.metadata.name.as_deref() == Some(source.name.as_str()) => {
            m.data.as_ref().and_then(|d| d.get(&source.key)).cloned()
        }
        _ => None,
    });
    let want: Vec<String> = (1..=nodes)
        .map(|n| format!("{n}=coffer-{n}.{PEER_DOMAIN}:7001/coffer-{n}.{PEER_DOMAIN}:7000"))
        .collect();
    if list.as_deref() != Some(want.join(",").as_str()) {
        error(format!(
            "the initial members are {list:?}, expected one per pod: {}",
            want.join(",")
        ));
    }
    for (var, port) in [
        ("COFFER_ADVERTISE_PEER_ADDR", 7001),
        ("COFFER_ADVERTISE_API_ADDR", 7000),
    ] {
        let value = env(var).and_then(|v| v.value.clone());
        if value.as_deref() != Some(format!("$(POD_NAME).{PEER_DOMAIN}:{port}").as_str()) {
            error(format!(
                "{var} is {value:?}, not the pod's peer DNS name and port {port}"
            ));
        }
    }
    let id_from_index = env("COFFER_NODE_ID")
        .and_then(|v| v.value_from.as_ref())
        .and_then(|f| f.field_ref.as_ref())
        .is_some_and(|f| f.field_path == "metadata.labels['apps.kubernetes.io/pod-index']");
    if !id_from_index {
        error("COFFER_NODE_ID must come from the pod-index label".into());
    }
}

#[test]
fn rendered_manifests_are_valid_kubernetes_objects_that_follow_the_rules() {
    let help = server_help();
    for (dir, nodes) in RENDERED {
        let docs = must_render(dir);
        let errors = problems(&docs, *nodes, &help);
        assert!(errors.is_empty(), "{dir}:\n  {}", errors.join("\n  "));
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "Namespace",
            "ServiceAccount",
            "ClusterRoleBinding",
            "ConfigMap",
            "Service",
            "StatefulSet",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ] {
            assert!(kinds.contains(kind), "{dir} renders no {kind}");
        }
    }
}

/// Renders the three-node overlay, changes every document of `kind` with `edit`, and returns
/// the problems found.
fn problems_after(kind: &str, edit: impl Fn(&mut Value)) -> Vec<String> {
    let mut docs = must_render("overlays/three-nodes");
    let mut edited = 0;
    for doc in docs.iter_mut().filter(|d| d["kind"] == kind) {
        edit(doc);
        edited += 1;
    }
    assert!(edited > 0, "the three-node overlay renders no {kind}");
    problems(&docs, 3, &server_help())
}

fn must_mention(errors: &[String], needle: &str) {
    assert!(
        errors.iter().any(|e| e.contains(needle)),
        "expected a problem mentioning {needle:?}, got {errors:?}"
    );
}

#[test]
fn the_checker_rejects_broken_manifests() {
    // A misspelt field is dropped by serde; the round trip catches it.
    let errors = problems_after("Service", |d| {
        let spec = d["spec"].as_object_mut().expect("a service has a spec");
        let v = spec
            .remove("publishNotReadyAddresses")
            .unwrap_or(Value::Bool(true));
        spec.insert("publishNotReadyAdresses".into(), v);
    });
    must_mention(
        &errors,
        "/spec/publishNotReadyAdresses is not part of the Kubernetes API",
    );
    // A field at the wrong level.
    let errors = problems_after("StatefulSet", |d| {
        d["spec"]["template"]["spec"]["readOnlyRootFilesystem"] = Value::Bool(true);
    });
    must_mention(
        &errors,
        "readOnlyRootFilesystem is not part of the Kubernetes API",
    );
    // An unexpected kind.
    let errors = problems_after("NetworkPolicy", |d| d["kind"] = "Secret".into());
    must_mention(&errors, "unexpected kind networking.k8s.io/v1/Secret");
    // A budget that would let a majority go.
    let errors = problems_after("PodDisruptionBudget", |d| {
        d["spec"]["maxUnavailable"] = 2.into()
    });
    must_mention(&errors, "maxUnavailable is Some(Int(2)), expected Int(1)");
    // Container rules.
    let errors = problems_after("StatefulSet", |d| {
        let c = &mut d["spec"]["template"]["spec"]["containers"][0];
        c["securityContext"]["privileged"] = Value::Bool(true);
        c.as_object_mut()
            .expect("a container")
            .remove("readinessProbe");
        c["args"]
            .as_array_mut()
            .expect("args")
            .push("--node-id-from-hostname".into());
        c["env"]
            .as_array_mut()
            .expect("env")
            .push(serde_json::json!({"name": "COFFER_NODEID", "value": "1"}));
        d["spec"]["podManagementPolicy"] = "OrderedReady".into();
        d["spec"]["replicas"] = 5.into();
        d["spec"]["template"]["spec"]
            .as_object_mut()
            .expect("a pod spec")
            .remove("affinity");
    });
    for needle in [
        "is privileged",
        "no readiness probe",
        "--node-id-from-hostname is not a `coffer server` flag",
        "COFFER_NODEID is not a `coffer server` environment variable",
        "podManagementPolicy must be Parallel",
        "runs Some(5) replicas, expected 3",
        "podAntiAffinity",
    ] {
        must_mention(&errors, needle);
    }
    // Scheduled backups on the pod's root filesystem would be lost with the pod.
    let errors = problems_after("ConfigMap", |d| {
        if let Some(Value::String(toml)) = d["data"].get_mut("config.toml") {
            *toml = toml.replace("/var/lib/coffer-backups", "/tmp/backups");
        }
    });
    must_mention(
        &errors,
        "snapshot_dir /tmp/backups is not the mount path of a volume claim of its own",
    );
    // A liveness probe on readiness would restart every sealed pod (Vault's deadlock).
    let errors = problems_after("StatefulSet", |d| {
        d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] =
            "/ready".into();
    });
    must_mention(
        &errors,
        "the liveness probe of the coffer container asks Some(\"/ready\"); it must ask /health",
    );
    // Initial members that do not match the replica count.
    let errors = problems_after("ConfigMap", |d| {
        if let Some(list) = d["data"].get_mut("initial-members") {
            *list = "1=coffer-1.coffer-peers.coffer.svc.cluster.local:7001/coffer-1.coffer-peers.coffer.svc.cluster.local:7000".into();
        }
    });
    must_mention(&errors, "the initial members are");
    // A config file key the server does not know.
    let errors = problems_after("ConfigMap", |d| {
        if let Some(Value::String(toml)) = d["data"].get_mut("config.toml") {
            toml.push_str("node_id_from_hostname = true\n");
        }
    });
    must_mention(&errors, "the config file key \"node_id_from_hostname\"");
    let errors = problems_after("Namespace", |_| {});
    assert!(
        errors.is_empty(),
        "an unchanged rendering passes: {errors:?}"
    );
}
