//! The chaos-mesh experiments in `chaos/mesh/` are never applied on CI (there is no
//! Kubernetes there), so this test is what keeps them applicable: it parses every `*.yaml` in
//! that directory and checks each document against the fields chaos-mesh v2.x defines for it
//! (`api/v1alpha1/*_types.go` and the validating webhooks next to them), plus what Coffer needs
//! (namespace `coffer`, the `app.kubernetes.io/name: coffer` selector, the data volume).
//!
//! Every spec level has an allow-list of keys, so a misspelt key fails instead of being
//! silently dropped by the API server. The validator is tested against deliberately broken
//! manifests at the end of this file, so it provably can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

const API_VERSION: &str = "chaos-mesh.org/v1alpha1";
const NAMESPACE: &str = "coffer";
const APP_LABEL_KEY: &str = "app.kubernetes.io/name";
const APP_LABEL_VALUE: &str = "coffer";
/// Where the StatefulSet mounts each node's data volume.
const DATA_VOLUME: &str = "/var/lib/coffer";

/// The local nemeses of `coffer-chaos` a manifest can name as its counterpart.
const NEMESES: &[&str] = &[
    "kill-one",
    "kill-leader",
    "kill-majority",
    "pause-one",
    "pause-leader",
    "partition-leader",
    "partition-majority",
    "partition-bridge",
    "partition-oneway",
    "delay",
    "disk-fault",
    "clock-skew",
    "membership",
];

/// The experiments the directory must hold: file, kind, action (if the kind has one), mode.
const EXPECTED: &[(&str, &str, Option<&str>, Option<&str>)] = &[
    (
        "pod-kill-one.yaml",
        "PodChaos",
        Some("pod-kill"),
        Some("one"),
    ),
    (
        "pod-kill-majority.yaml",
        "PodChaos",
        Some("pod-kill"),
        Some("fixed"),
    ),
    (
        "pod-failure.yaml",
        "PodChaos",
        Some("pod-failure"),
        Some("one"),
    ),
    (
        "network-partition.yaml",
        "NetworkChaos",
        Some("partition"),
        Some("one"),
    ),
    (
        "network-partition-oneway.yaml",
        "NetworkChaos",
        Some("partition"),
        Some("one"),
    ),
    (
        "network-delay.yaml",
        "NetworkChaos",
        Some("delay"),
        Some("all"),
    ),
    ("io-fault.yaml", "IOChaos", Some("fault"), Some("one")),
    ("time-skew.yaml", "TimeChaos", None, Some("one")),
    ("workflow.yaml", "Workflow", None, None),
];

// ---------------------------------------------------------------------------------------------
// What chaos-mesh defines.

const MODES: &[&str] = &["one", "all", "fixed", "fixed-percent", "random-max-percent"];

/// `PodSelector`: the pods and how many of them.
const POD_SELECTOR_KEYS: &[&str] = &["selector", "mode", "value"];
/// `ContainerSelector` adds the containers inside them.
const CONTAINER_SELECTOR_KEYS: &[&str] = &["selector", "mode", "value", "containerNames"];
/// `PodSelectorSpec` (with the inlined `GenericSelectorSpec`).
const SELECTOR_SPEC_KEYS: &[&str] = &[
    "namespaces",
    "fieldSelectors",
    "labelSelectors",
    "expressionSelectors",
    "annotationSelectors",
    "nodes",
    "pods",
    "nodeSelectors",
    "podPhaseSelectors",
];
/// Fields every chaos spec here has besides its selector.
const COMMON_SPEC_KEYS: &[&str] = &["duration", "remoteCluster"];

/// `IoMethod` values.
const IO_METHODS: &[&str] = &[
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
    "getlk",
    "setlk",
    "bmap",
];

/// The clocks TimeChaos can move.
const CLOCK_IDS: &[&str] = &[
    "CLOCK_REALTIME",
    "CLOCK_MONOTONIC",
    "CLOCK_PROCESS_CPUTIME_ID",
    "CLOCK_THREAD_CPUTIME_ID",
    "CLOCK_MONOTONIC_RAW",
    "CLOCK_REALTIME_COARSE",
    "CLOCK_MONOTONIC_COARSE",
    "CLOCK_BOOTTIME",
    "CLOCK_REALTIME_ALARM",
    "CLOCK_BOOTTIME_ALARM",
];

/// One chaos kind: its name, the key a Workflow template embeds its spec under, the actions
/// it accepts (`None`: it has no `action` field), whether it selects containers or only pods,
/// and its own spec keys.
#[derive(Debug)]
struct ChaosKind {
    kind: &'static str,
    embed_key: &'static str,
    actions: Option<&'static [&'static str]>,
    selects_containers: bool,
    own_keys: &'static [&'static str],
}

const CHAOS_KINDS: &[ChaosKind] = &[
    ChaosKind {
        kind: "PodChaos",
        embed_key: "podChaos",
        actions: Some(&["pod-kill", "pod-failure", "container-kill"]),
        selects_containers: true,
        own_keys: &["action", "gracePeriod"],
    },
    ChaosKind {
        kind: "NetworkChaos",
        embed_key: "networkChaos",
        actions: Some(&[
            "netem",
            "delay",
            "loss",
            "duplicate",
            "corrupt",
            "partition",
            "bandwidth",
        ]),
        selects_containers: false,
        own_keys: &[
            "action",
            "device",
            "delay",
            "loss",
            "duplicate",
            "corrupt",
            "bandwidth",
            "rate",
            "direction",
            "target",
            "targetDevice",
            "externalTargets",
        ],
    },
    ChaosKind {
        kind: "IOChaos",
        embed_key: "ioChaos",
        actions: Some(&["latency", "fault", "attrOverride", "mistake"]),
        selects_containers: true,
        own_keys: &[
            "action",
            "delay",
            "errno",
            "attr",
            "mistake",
            "path",
            "methods",
            "percent",
            "volumePath",
        ],
    },
    ChaosKind {
        kind: "TimeChaos",
        embed_key: "timeChaos",
        actions: None,
        selects_containers: true,
        own_keys: &["timeOffset", "clockIds"],
    },
    ChaosKind {
        kind: "StressChaos",
        embed_key: "stressChaos",
        actions: None,
        selects_containers: true,
        own_keys: &["stressors", "stressngStressors"],
    },
];

fn chaos_kind(kind: &str) -> Option<&'static ChaosKind> {
    CHAOS_KINDS.iter().find(|k| k.kind == kind)
}

/// The NetworkChaos traffic-control blocks and the actions that read each.
const TC_BLOCKS: &[(&str, &[&str])] = &[
    ("delay", &["delay", "netem"]),
    ("loss", &["loss", "netem"]),
    ("duplicate", &["duplicate", "netem"]),
    ("corrupt", &["corrupt", "netem"]),
    ("rate", &["netem"]),
    ("bandwidth", &["bandwidth"]),
];

// ---------------------------------------------------------------------------------------------
// Go durations, as `time.ParseDuration` reads them.

/// Parses a Go duration ("300ms", "-1.5h", "2h45m") into nanoseconds, with Go's rules: an
/// optional sign, then one or more decimal numbers (optionally with a fraction) each followed
/// by a unit among ns, us (µs), ms, s, m, h; "0" alone needs no unit; at most 2^63-1 ns.
fn parse_go_duration(text: &str) -> Result<i128, String> {
    let invalid = |why: &str| format!("invalid Go duration {text:?}: {why}");
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(invalid("empty"));
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_digits, after_int) = rest.split_at(int_len);
        let (frac_digits, after_number) = match after_int.strip_prefix('.') {
            Some(after_dot) => {
                let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
                after_dot.split_at(frac_len)
            }
            None => ("", after_int),
        };
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(invalid("expected a number"));
        }
        let unit_len = after_number
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after_number.len());
        let (unit, after_unit) = after_number.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => return Err(invalid("missing unit")),
            other => return Err(invalid(&format!("unknown unit {other:?}"))),
        };
        let whole: u128 = if int_digits.is_empty() {
            0
        } else {
            int_digits.parse().map_err(|_| invalid("overflow"))?
        };
        let mut value = whole
            .checked_mul(scale)
            .ok_or_else(|| invalid("overflow"))?;
        // The fraction, truncated to whole nanoseconds; digits past the 20th cannot matter.
        let mut numerator: u128 = 0;
        let mut denominator: u128 = 1;
        for digit in frac_digits.bytes().take(20) {
            numerator = numerator * 10 + u128::from(digit - b'0');
            denominator *= 10;
        }
        value += numerator * scale / denominator;
        total = total
            .checked_add(value)
            .ok_or_else(|| invalid("overflow"))?;
        if total > 1 << 63 {
            return Err(invalid("overflow"));
        }
        rest = after_unit;
    }
    let limit: u128 = if negative { 1 << 63 } else { (1 << 63) - 1 };
    if total > limit {
        return Err(invalid("overflow"));
    }
    let magnitude = i128::try_from(total).map_err(|_| invalid("overflow"))?;
    Ok(if negative { -magnitude } else { magnitude })
}

/// The stricter form tc latencies must take (chaos-mesh's CRD pattern
/// `^[0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h)$`): one unsigned number and one unit.
fn is_tc_duration(text: &str) -> bool {
    let Some(unit_start) = text.find(|c: char| !(c.is_ascii_digit() || c == '.')) else {
        return false;
    };
    let (number, unit) = text.split_at(unit_start);
    let number_ok = match number.split_once('.') {
        Some((whole, frac)) => {
            !whole.is_empty()
                && !frac.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && frac.bytes().all(|b| b.is_ascii_digit())
        }
        None => !number.is_empty(),
    };
    number_ok && matches!(unit, "ns" | "us" | "ms" | "s" | "m" | "h")
}

// ---------------------------------------------------------------------------------------------
// The validator.

/// What is wrong with a manifest, each problem prefixed with where it is.
#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, at: &str, what: impl Display) {
        let at = if at.is_empty() { "(document)" } else { at };
        self.0.push(format!("{at}: {what}"));
    }
}

fn path(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

fn key_names(m: &Mapping) -> Vec<String> {
    m.keys()
        .map(|k| k.as_str().map_or_else(|| format!("{k:?}"), str::to_string))
        .collect()
}

/// Rejects every key not in `allowed` (a typo would otherwise be dropped silently).
fn only_keys(m: &Mapping, allowed: &[&str], at: &str, p: &mut Problems) {
    for key in key_names(m) {
        if !allowed.contains(&key.as_str()) {
            p.add(
                at,
                format!("unknown key `{key}` (allowed here: {})", allowed.join(", ")),
            );
        }
    }
}

fn as_mapping<'a>(v: &'a Value, at: &str, p: &mut Problems) -> Option<&'a Mapping> {
    let m = v.as_mapping();
    if m.is_none() {
        p.add(at, "expected a mapping");
    }
    m
}

fn required<'a>(m: &'a Mapping, key: &str, at: &str, p: &mut Problems) -> Option<&'a Value> {
    let v = m.get(key);
    if v.is_none() {
        p.add(&path(at, key), "required but missing");
    }
    v
}

/// A string field: YAML numbers or booleans are rejected, as the API server's schema would.
fn string_field<'a>(v: &'a Value, at: &str, p: &mut Problems) -> Option<&'a str> {
    let s = v.as_str();
    if s.is_none() {
        p.add(at, format!("expected a string, found {v:?}"));
    }
    s
}

fn required_str<'a>(m: &'a Mapping, key: &str, at: &str, p: &mut Problems) -> Option<&'a str> {
    required(m, key, at, p).and_then(|v| string_field(v, &path(at, key), p))
}

fn optional_str<'a>(m: &'a Mapping, key: &str, at: &str, p: &mut Problems) -> Option<&'a str> {
    m.get(key).and_then(|v| string_field(v, &path(at, key), p))
}

fn string_list<'a>(v: &'a Value, at: &str, p: &mut Problems) -> Vec<&'a str> {
    let Some(items) = v.as_sequence() else {
        p.add(at, "expected a list of strings");
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| string_field(item, &format!("{at}[{i}]"), p))
        .collect()
}

fn one_of(value: &str, allowed: &[&str], what: &str, at: &str, p: &mut Problems) -> bool {
    let ok = allowed.contains(&value);
    if !ok {
        p.add(
            at,
            format!("unknown {what} `{value}` (one of: {})", allowed.join(", ")),
        );
    }
    ok
}

/// A duration that must parse as a Go duration and be positive (a fault's length, a deadline).
fn positive_duration(v: &Value, at: &str, p: &mut Problems) -> Option<i128> {
    let text = string_field(v, at, p)?;
    match parse_go_duration(text) {
        Ok(ns) if ns > 0 => Some(ns),
        Ok(_) => {
            p.add(at, format!("duration {text:?} must be positive"));
            None
        }
        Err(e) => {
            p.add(at, e);
            None
        }
    }
}

/// A Kubernetes object name (DNS-1123 subdomain).
fn is_object_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A string holding an integer (selector `value`), within `range`.
fn integer_string(v: &Value, range: std::ops::RangeInclusive<u64>, at: &str, p: &mut Problems) {
    let Some(text) = string_field(v, at, p) else {
        return;
    };
    match text.parse::<u64>() {
        Ok(n) if range.contains(&n) => {}
        Ok(n) => p.add(
            at,
            format!("{n} is out of range {}..={}", range.start(), range.end()),
        ),
        Err(_) => p.add(at, format!("{text:?} is not an integer")),
    }
}

/// An integer field (not a string), within `range`.
fn integer(v: &Value, range: std::ops::RangeInclusive<i64>, at: &str, p: &mut Problems) {
    match v.as_i64() {
        Some(n) if range.contains(&n) => {}
        Some(n) => p.add(
            at,
            format!("{n} is out of range {}..={}", range.start(), range.end()),
        ),
        None => p.add(at, format!("expected an integer, found {v:?}")),
    }
}

/// A float held in a string (netem percentages such as `correlation`), in 0..=100.
fn percent_string(v: &Value, at: &str, p: &mut Problems) {
    let Some(text) = string_field(v, at, p) else {
        return;
    };
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=100.0).contains(&x) => {}
        Ok(_) => p.add(at, format!("{text:?} is not a percentage in 0..=100")),
        Err(_) => p.add(at, format!("{text:?} is not a number")),
    }
}

/// `selector` + `mode` + `value` (a `PodSelector`), which must pick Coffer pods.
fn check_pod_selector(m: &Mapping, at: &str, p: &mut Problems) {
    if let Some(selector) = required(m, "selector", at, p) {
        let at = path(at, "selector");
        if let Some(sel) = as_mapping(selector, &at, p) {
            only_keys(sel, SELECTOR_SPEC_KEYS, &at, p);
            if let Some(labels) = required(sel, "labelSelectors", &at, p) {
                let at = path(&at, "labelSelectors");
                if let Some(labels) = as_mapping(labels, &at, p) {
                    match labels.get(APP_LABEL_KEY).and_then(Value::as_str) {
                        Some(APP_LABEL_VALUE) => {}
                        other => p.add(
                            &at,
                            format!(
                                "must select `{APP_LABEL_KEY}: {APP_LABEL_VALUE}`, found {other:?}"
                            ),
                        ),
                    }
                }
            }
            if let Some(namespaces) = required(sel, "namespaces", &at, p) {
                let at = path(&at, "namespaces");
                let namespaces = string_list(namespaces, &at, p);
                if namespaces != [NAMESPACE] {
                    p.add(&at, format!("must be [{NAMESPACE}], found {namespaces:?}"));
                }
            }
        }
    }
    let mode = required_str(m, "mode", at, p);
    if let Some(mode) = mode {
        one_of(mode, MODES, "mode", &path(at, "mode"), p);
    }
    let value_at = path(at, "value");
    match (mode, m.get("value")) {
        (Some("fixed"), Some(v)) => integer_string(v, 1..=u64::MAX, &value_at, p),
        (Some("fixed-percent" | "random-max-percent"), Some(v)) => {
            integer_string(v, 1..=100, &value_at, p);
        }
        (Some(mode @ ("fixed" | "fixed-percent" | "random-max-percent")), None) => {
            p.add(&value_at, format!("required with mode `{mode}`"));
        }
        (_, Some(v)) => {
            string_field(v, &value_at, p);
        }
        (_, None) => {}
    }
}

/// Where a chaos spec sits decides whether it needs its own `duration`: a standalone
/// experiment without one never ends by itself, while in a Workflow the template's
/// `deadline` ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Standalone,
    InWorkflow,
}

fn check_chaos_spec(
    kind: &ChaosKind,
    spec: &Value,
    placement: Placement,
    at: &str,
    p: &mut Problems,
) {
    let Some(spec) = as_mapping(spec, at, p) else {
        return;
    };
    let selector_keys = if kind.selects_containers {
        CONTAINER_SELECTOR_KEYS
    } else {
        POD_SELECTOR_KEYS
    };
    let allowed: Vec<&str> = selector_keys
        .iter()
        .chain(COMMON_SPEC_KEYS)
        .chain(kind.own_keys)
        .copied()
        .collect();
    only_keys(spec, &allowed, at, p);
    check_pod_selector(spec, at, p);
    if let Some(names) = spec.get("containerNames") {
        string_list(names, &path(at, "containerNames"), p);
    }
    if let Some(cluster) = spec.get("remoteCluster") {
        string_field(cluster, &path(at, "remoteCluster"), p);
    }

    let action = match kind.actions {
        Some(actions) => {
            let action = required_str(spec, "action", at, p);
            action.filter(|a| one_of(a, actions, "action", &path(at, "action"), p))
        }
        None => None,
    };
    let instantaneous = matches!(action, Some("pod-kill" | "container-kill"));
    match spec.get("duration") {
        Some(v) => {
            positive_duration(v, &path(at, "duration"), p);
        }
        None if placement == Placement::Standalone && !instantaneous => p.add(
            &path(at, "duration"),
            "required: without it the fault lasts until the object is deleted",
        ),
        None => {}
    }

    match kind.kind {
        "PodChaos" => check_pod_chaos(spec, action, at, p),
        "NetworkChaos" => check_network_chaos(spec, action, at, p),
        "IOChaos" => check_io_chaos(spec, action, at, p),
        "TimeChaos" => check_time_chaos(spec, at, p),
        "StressChaos" => check_stress_chaos(spec, at, p),
        other => p.add(at, format!("no checks for kind {other}")),
    }
}

fn check_pod_chaos(spec: &Mapping, action: Option<&str>, at: &str, p: &mut Problems) {
    if let Some(v) = spec.get("gracePeriod") {
        integer(v, 0..=i64::MAX, &path(at, "gracePeriod"), p);
    }
    if action == Some("container-kill")
        && spec
            .get("containerNames")
            .and_then(Value::as_sequence)
            .is_none_or(Vec::is_empty)
    {
        p.add(
            &path(at, "containerNames"),
            "required with action container-kill",
        );
    }
}

fn check_network_chaos(spec: &Mapping, action: Option<&str>, at: &str, p: &mut Problems) {
    let direction = optional_str(spec, "direction", at, p);
    if let Some(direction) = direction {
        one_of(
            direction,
            &["to", "from", "both"],
            "direction",
            &path(at, "direction"),
            p,
        );
    }
    let has_target = match spec.get("target") {
        Some(target) => {
            let at = path(at, "target");
            if let Some(target) = as_mapping(target, &at, p) {
                only_keys(target, POD_SELECTOR_KEYS, &at, p);
                check_pod_selector(target, &at, p);
            }
            true
        }
        None => false,
    };
    if action == Some("partition") && !has_target {
        p.add(
            &path(at, "target"),
            "required with action partition: the pods to cut the selected ones off from",
        );
    }
    if action.is_some_and(|a| a != "partition")
        && matches!(direction, Some("from" | "both"))
        && !has_target
    {
        p.add(
            &path(at, "direction"),
            "`from` and `both` need a target for netem actions",
        );
    }
    for key in ["device", "targetDevice"] {
        optional_str(spec, key, at, p);
    }
    if let Some(v) = spec.get("externalTargets") {
        string_list(v, &path(at, "externalTargets"), p);
    }

    for (block, used_by) in TC_BLOCKS {
        let at = path(at, block);
        match (spec.get(*block), action) {
            (Some(_), Some(action)) if !used_by.contains(&action) => {
                p.add(&at, format!("has no effect with action {action}"));
            }
            (Some(v), _) => check_tc_block(block, v, &at, p),
            (None, Some(action)) if action == *block => {
                p.add(&at, format!("required with action {action}"));
            }
            (None, _) => {}
        }
    }
    if action == Some("netem")
        && !["delay", "loss", "duplicate", "corrupt", "rate"]
            .iter()
            .any(|k| spec.contains_key(*k))
    {
        p.add(
            at,
            "action netem needs at least one of delay, loss, duplicate, corrupt, rate",
        );
    }
}

fn check_tc_block(block: &str, v: &Value, at: &str, p: &mut Problems) {
    let Some(m) = as_mapping(v, at, p) else {
        return;
    };
    match block {
        "delay" => {
            only_keys(m, &["latency", "correlation", "jitter", "reorder"], at, p);
            if let Some(latency) = required_str(m, "latency", at, p) {
                check_tc_duration(latency, &path(at, "latency"), p);
            }
            if let Some(jitter) = optional_str(m, "jitter", at, p) {
                check_tc_duration(jitter, &path(at, "jitter"), p);
            }
            if let Some(c) = m.get("correlation") {
                percent_string(c, &path(at, "correlation"), p);
            }
            if let Some(reorder) = m.get("reorder") {
                let at = path(at, "reorder");
                if let Some(r) = as_mapping(reorder, &at, p) {
                    only_keys(r, &["reorder", "correlation", "gap"], &at, p);
                    if let Some(v) = required(r, "reorder", &at, p) {
                        percent_string(v, &path(&at, "reorder"), p);
                    }
                    if let Some(v) = r.get("correlation") {
                        percent_string(v, &path(&at, "correlation"), p);
                    }
                    if let Some(v) = required(r, "gap", &at, p) {
                        integer(v, 0..=i64::MAX, &path(&at, "gap"), p);
                    }
                }
            }
        }
        "loss" | "duplicate" | "corrupt" => {
            only_keys(m, &[block, "correlation"], at, p);
            if let Some(v) = required(m, block, at, p) {
                percent_string(v, &path(at, block), p);
            }
            if let Some(v) = m.get("correlation") {
                percent_string(v, &path(at, "correlation"), p);
            }
        }
        "rate" => {
            only_keys(m, &["rate"], at, p);
            required_str(m, "rate", at, p);
        }
        "bandwidth" => {
            only_keys(
                m,
                &["rate", "limit", "buffer", "peakrate", "minburst"],
                at,
                p,
            );
            required_str(m, "rate", at, p);
            for key in ["limit", "buffer"] {
                if let Some(v) = required(m, key, at, p) {
                    integer(v, 1..=i64::from(u32::MAX), &path(at, key), p);
                }
            }
            for key in ["peakrate", "minburst"] {
                if let Some(v) = m.get(key) {
                    integer(v, 0..=i64::MAX, &path(at, key), p);
                }
            }
        }
        other => p.add(at, format!("no checks for tc block {other}")),
    }
}

fn check_tc_duration(text: &str, at: &str, p: &mut Problems) {
    if !is_tc_duration(text) {
        p.add(
            at,
            format!("{text:?} is not one number and a unit (ns, us, ms, s, m, h)"),
        );
    } else if let Err(e) = parse_go_duration(text) {
        p.add(at, e);
    }
}

fn check_io_chaos(spec: &Mapping, action: Option<&str>, at: &str, p: &mut Problems) {
    let volume = required_str(spec, "volumePath", at, p);
    if let Some(volume) = volume
        && volume != DATA_VOLUME
    {
        p.add(
            &path(at, "volumePath"),
            format!("{volume:?} is not Coffer's data volume {DATA_VOLUME:?}"),
        );
    }
    if let Some(file_path) = optional_str(spec, "path", at, p)
        && let Some(volume) = volume
        && !file_path.starts_with(&format!("{}/", volume.trim_end_matches('/')))
    {
        p.add(
            &path(at, "path"),
            format!("{file_path:?} is not under volumePath {volume:?}"),
        );
    }
    match (action, spec.get("errno")) {
        (Some("fault"), Some(v)) => integer(v, 1..=4095, &path(at, "errno"), p),
        (Some("fault"), None) => p.add(&path(at, "errno"), "required with action fault"),
        (Some(action), Some(_)) => p.add(
            &path(at, "errno"),
            format!("has no effect with action {action}"),
        ),
        (None, _) | (Some(_), None) => {}
    }
    if let Some(v) = spec.get("percent") {
        integer(v, 0..=100, &path(at, "percent"), p);
    }
    if let Some(v) = spec.get("methods") {
        let at = path(at, "methods");
        let methods = string_list(v, &at, p);
        if methods.is_empty() {
            p.add(&at, "empty: leave it out to mean every method");
        }
        for method in methods {
            one_of(method, IO_METHODS, "I/O method", &at, p);
        }
    }
    match action {
        Some("latency") => match spec.get("delay") {
            Some(v) => {
                positive_duration(v, &path(at, "delay"), p);
            }
            None => p.add(&path(at, "delay"), "required with action latency"),
        },
        Some("attrOverride") => {
            if let Some(v) = required(spec, "attr", at, p) {
                as_mapping(v, &path(at, "attr"), p);
            }
        }
        Some("mistake") => {
            if let Some(v) = required(spec, "mistake", at, p) {
                as_mapping(v, &path(at, "mistake"), p);
            }
        }
        _ => {}
    }
}

fn check_time_chaos(spec: &Mapping, at: &str, p: &mut Problems) {
    if let Some(offset) = required_str(spec, "timeOffset", at, p) {
        match parse_go_duration(offset) {
            Ok(0) => p.add(&path(at, "timeOffset"), "an offset of zero changes nothing"),
            Ok(_) => {}
            Err(e) => p.add(&path(at, "timeOffset"), e),
        }
    }
    if let Some(v) = spec.get("clockIds") {
        let at = path(at, "clockIds");
        for clock in string_list(v, &at, p) {
            one_of(clock, CLOCK_IDS, "clock id", &at, p);
        }
    }
}

fn check_stress_chaos(spec: &Mapping, at: &str, p: &mut Problems) {
    if let Some(v) = spec.get("stressors") {
        as_mapping(v, &path(at, "stressors"), p);
    }
    optional_str(spec, "stressngStressors", at, p);
    if !spec.contains_key("stressors") && !spec.contains_key("stressngStressors") {
        p.add(at, "needs stressors or stressngStressors");
    }
}

/// What this validator understands of a Workflow template (chaos-mesh has more: Task,
/// Schedule, StatusCheck; add their checks before using them).
const TEMPLATE_BASE_KEYS: &[&str] = &["name", "templateType", "deadline", "children"];

fn check_workflow(spec: &Value, at: &str, p: &mut Problems) {
    let Some(spec) = as_mapping(spec, at, p) else {
        return;
    };
    only_keys(spec, &["entry", "templates"], at, p);
    let entry = required_str(spec, "entry", at, p);
    let Some(templates) = required(spec, "templates", at, p) else {
        return;
    };
    let templates_at = path(at, "templates");
    let Some(templates) = templates.as_sequence() else {
        p.add(&templates_at, "expected a list of templates");
        return;
    };
    if templates.is_empty() {
        p.add(&templates_at, "empty");
    }

    let mut allowed: Vec<&str> = TEMPLATE_BASE_KEYS.to_vec();
    allowed.extend(CHAOS_KINDS.iter().map(|k| k.embed_key));

    let mut by_name: Templates = BTreeMap::new();
    for (i, template) in templates.iter().enumerate() {
        let at = format!("{templates_at}[{i}]");
        let Some(t) = as_mapping(template, &at, p) else {
            continue;
        };
        let name = required_str(t, "name", &at, p);
        let at = match name {
            Some(name) => format!("{templates_at}[{name}]"),
            None => at,
        };
        only_keys(t, &allowed, &at, p);
        if let Some(name) = name
            && !is_object_name(name)
        {
            p.add(&path(&at, "name"), format!("{name:?} is not a valid name"));
        }
        let template_type = required_str(t, "templateType", &at, p);
        let deadline = t
            .get("deadline")
            .and_then(|v| positive_duration(v, &path(&at, "deadline"), p));
        let children: Vec<&str> = t
            .get("children")
            .map(|v| string_list(v, &path(&at, "children"), p))
            .unwrap_or_default();
        let embedded: Vec<&ChaosKind> = CHAOS_KINDS
            .iter()
            .filter(|k| t.contains_key(k.embed_key))
            .collect();

        match template_type {
            Some("Serial" | "Parallel") if children.is_empty() => p.add(
                &path(&at, "children"),
                "a Serial or Parallel template needs children",
            ),
            Some("Suspend") if !t.contains_key("deadline") => p.add(
                &path(&at, "deadline"),
                "required: it is how long to suspend",
            ),
            Some("Serial" | "Parallel" | "Suspend") | None => {}
            Some(kind) => match chaos_kind(kind) {
                Some(chaos) => {
                    match t.get(chaos.embed_key) {
                        Some(embedded_spec) => check_chaos_spec(
                            chaos,
                            embedded_spec,
                            Placement::InWorkflow,
                            &path(&at, chaos.embed_key),
                            p,
                        ),
                        None => p.add(
                            &path(&at, chaos.embed_key),
                            format!("required with templateType {kind}"),
                        ),
                    }
                    if !t.contains_key("deadline") {
                        p.add(
                            &path(&at, "deadline"),
                            "required: it is how long the chaos step lasts",
                        );
                    }
                }
                None => {
                    let mut known = vec!["Serial", "Parallel", "Suspend"];
                    known.extend(CHAOS_KINDS.iter().map(|k| k.kind));
                    one_of(kind, &known, "templateType", &path(&at, "templateType"), p);
                }
            },
        }
        if !matches!(template_type, Some("Serial" | "Parallel")) && t.contains_key("children") {
            p.add(
                &path(&at, "children"),
                "only Serial and Parallel templates have children",
            );
        }
        for chaos in embedded {
            if template_type != Some(chaos.kind) {
                p.add(
                    &path(&at, chaos.embed_key),
                    format!(
                        "a {} spec in a template of type {}",
                        chaos.kind,
                        template_type.unwrap_or("(none)")
                    ),
                );
            }
        }
        if let (Some(name), Some(template_type)) = (name, template_type)
            && by_name
                .insert(name, (template_type, children, deadline))
                .is_some()
        {
            p.add(&at, format!("a second template named {name:?}"));
        }
    }

    for (name, (_, children, _)) in &by_name {
        for child in children {
            if !by_name.contains_key(child) {
                p.add(
                    &format!("{templates_at}[{name}].children"),
                    format!("names a template that does not exist: {child:?}"),
                );
            }
        }
    }
    let Some(entry) = entry else {
        return;
    };
    if !by_name.contains_key(entry) {
        p.add(
            &path(at, "entry"),
            format!("names a template that does not exist: {entry:?}"),
        );
        return;
    }

    // Walk from the entry: every template reachable, no cycles, and a Serial or Parallel
    // deadline long enough for its children's.
    let mut reached = BTreeSet::new();
    let mut stack = Vec::new();
    walk(entry, &by_name, &mut stack, &mut reached, &templates_at, p);
    for name in by_name.keys() {
        if !reached.contains(name) {
            p.add(
                &format!("{templates_at}[{name}]"),
                "not reachable from the entry (a misspelt child?)",
            );
        }
    }
}

/// Workflow templates by name: type, children, own deadline (ns).
type Templates<'a> = BTreeMap<&'a str, (&'a str, Vec<&'a str>, Option<i128>)>;

/// How long a template runs at most (ns), or `None` when unbounded or unknown; reports cycles
/// and Serial/Parallel deadlines shorter than their children need.
fn walk<'a>(
    name: &'a str,
    templates: &Templates<'a>,
    stack: &mut Vec<&'a str>,
    reached: &mut BTreeSet<&'a str>,
    at: &str,
    p: &mut Problems,
) -> Option<i128> {
    let (template_type, children, deadline) = templates.get(name)?;
    if stack.contains(&name) {
        p.add(
            &format!("{at}[{name}]"),
            format!("is part of a cycle: {} -> {name}", stack.join(" -> ")),
        );
        return None;
    }
    reached.insert(name);
    stack.push(name);
    let spans: Vec<Option<i128>> = children
        .iter()
        .map(|&child| walk(child, templates, stack, reached, at, p))
        .collect();
    stack.pop();
    let needed = match *template_type {
        "Serial" => spans.iter().copied().sum::<Option<i128>>(),
        "Parallel" => spans
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()
            .and_then(|spans| spans.into_iter().max()),
        _ => None,
    };
    if let (Some(deadline), Some(needed)) = (deadline, needed)
        && *deadline < needed
    {
        p.add(
            &format!("{at}[{name}].deadline"),
            format!(
                "{}s cuts its children short: they take {}s",
                deadline / 1_000_000_000,
                needed / 1_000_000_000
            ),
        );
    }
    deadline.or(needed)
}

/// Checks one parsed document.
fn check_document(doc: &Value, p: &mut Problems) {
    let Some(top) = as_mapping(doc, "", p) else {
        return;
    };
    only_keys(top, &["apiVersion", "kind", "metadata", "spec"], "", p);
    if let Some(api_version) = required_str(top, "apiVersion", "", p)
        && api_version != API_VERSION
    {
        p.add(
            "apiVersion",
            format!("{api_version:?} is not {API_VERSION:?}"),
        );
    }
    if let Some(metadata) = required(top, "metadata", "", p)
        && let Some(metadata) = as_mapping(metadata, "metadata", p)
    {
        only_keys(
            metadata,
            &["name", "namespace", "labels", "annotations"],
            "metadata",
            p,
        );
        if let Some(name) = required_str(metadata, "name", "metadata", p)
            && !is_object_name(name)
        {
            p.add("metadata.name", format!("{name:?} is not a valid name"));
        }
        if let Some(namespace) = required_str(metadata, "namespace", "metadata", p)
            && namespace != NAMESPACE
        {
            p.add(
                "metadata.namespace",
                format!("{namespace:?} is not {NAMESPACE:?}"),
            );
        }
    }
    let kind = required_str(top, "kind", "", p);
    let spec = required(top, "spec", "", p);
    match (kind, spec) {
        (Some("Workflow"), Some(spec)) => check_workflow(spec, "spec", p),
        (Some(kind), Some(spec)) => match chaos_kind(kind) {
            Some(chaos) => check_chaos_spec(chaos, spec, Placement::Standalone, "spec", p),
            None => {
                let mut known: Vec<&str> = CHAOS_KINDS.iter().map(|k| k.kind).collect();
                known.push("Workflow");
                one_of(kind, &known, "kind", "kind", p);
            }
        },
        _ => {}
    }
}

/// Every non-empty document of a YAML text (several may be separated by `---`).
fn documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(text) {
        let doc = Value::deserialize(de).map_err(|e| format!("not YAML: {e}"))?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// The problems of every document of a YAML text; empty when all are valid.
fn check_text(text: &str) -> Vec<String> {
    let mut p = Problems::default();
    match documents(text) {
        Ok(docs) if docs.is_empty() => p.add("", "no document"),
        Ok(docs) => {
            for (i, doc) in docs.iter().enumerate() {
                let mut doc_problems = Problems::default();
                check_document(doc, &mut doc_problems);
                p.0.extend(
                    doc_problems
                        .0
                        .into_iter()
                        .map(|problem| format!("document {}: {problem}", i + 1)),
                );
            }
        }
        Err(e) => p.add("", e),
    }
    p.0
}

// ---------------------------------------------------------------------------------------------
// The manifests in chaos/mesh.

fn mesh_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mesh")
}

/// (file name, contents) of every `*.yaml` in chaos/mesh, sorted by name.
fn manifests() -> Vec<(String, String)> {
    let dir = mesh_dir();
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .map(|path| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("UTF-8 file name")
                .to_string();
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            (name, text)
        })
        .collect();
    files.sort();
    files
}

fn lookup<'a>(doc: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(doc, |v, key| v.get(key))
}

#[test]
fn every_manifest_in_chaos_mesh_follows_the_chaos_mesh_schema() {
    let files = manifests();
    assert!(
        files.len() >= EXPECTED.len(),
        "expected at least {} manifests in {}, found {:?}",
        EXPECTED.len(),
        mesh_dir().display(),
        files.iter().map(|(name, _)| name).collect::<Vec<_>>()
    );
    let mut problems = Vec::new();
    let mut documents_checked = 0;
    for (name, text) in &files {
        documents_checked += documents(text).map_or(0, |docs| docs.len());
        problems.extend(
            check_text(text)
                .into_iter()
                .map(|problem| format!("{name}: {problem}")),
        );
    }
    assert!(
        problems.is_empty(),
        "manifests that chaos-mesh would reject or misread:\n{}",
        problems.join("\n")
    );
    assert!(documents_checked >= files.len());
}

#[test]
fn each_file_holds_the_experiment_its_name_promises() {
    let files: BTreeMap<String, String> = manifests().into_iter().collect();
    for (file, kind, action, mode) in EXPECTED {
        let text = files
            .get(*file)
            .unwrap_or_else(|| panic!("chaos/mesh/{file} is missing"));
        let docs = documents(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(docs.len(), 1, "{file}: one experiment per file");
        let doc = &docs[0];
        assert_eq!(
            lookup(doc, "kind").and_then(Value::as_str),
            Some(*kind),
            "{file}"
        );
        assert_eq!(
            lookup(doc, "spec.action").and_then(Value::as_str),
            *action,
            "{file}"
        );
        assert_eq!(
            lookup(doc, "spec.mode").and_then(Value::as_str),
            *mode,
            "{file}"
        );
    }
    let majority = documents(&files["pod-kill-majority.yaml"]).expect("parses");
    assert_eq!(
        lookup(&majority[0], "spec.value").and_then(Value::as_str),
        Some("2")
    );
    let oneway = documents(&files["network-partition-oneway.yaml"]).expect("parses");
    assert_eq!(
        lookup(&oneway[0], "spec.direction").and_then(Value::as_str),
        Some("to")
    );
    let partition = documents(&files["network-partition.yaml"]).expect("parses");
    assert_eq!(
        lookup(&partition[0], "spec.direction").and_then(Value::as_str),
        Some("both")
    );

    // The workflow strings the five faults together, with pauses between them.
    let workflow = documents(&files["workflow.yaml"]).expect("parses");
    let templates = lookup(&workflow[0], "spec.templates")
        .and_then(Value::as_sequence)
        .expect("templates");
    let types: BTreeSet<&str> = templates
        .iter()
        .filter_map(|t| t.get("templateType").and_then(Value::as_str))
        .collect();
    for needed in [
        "Serial",
        "Suspend",
        "PodChaos",
        "NetworkChaos",
        "IOChaos",
        "TimeChaos",
    ] {
        assert!(types.contains(needed), "workflow.yaml has no {needed} step");
    }
    let network_actions: BTreeSet<&str> = templates
        .iter()
        .filter_map(|t| lookup(t, "networkChaos.action").and_then(Value::as_str))
        .collect();
    assert_eq!(
        network_actions,
        BTreeSet::from(["delay", "partition"]),
        "workflow.yaml partitions and delays"
    );
}

#[test]
fn every_manifest_says_what_it_does_and_which_local_nemesis_imitates_it() {
    for (name, text) in manifests() {
        let header: Vec<&str> = text
            .lines()
            .take_while(|line| line.starts_with('#'))
            .collect();
        assert!(
            header.len() >= 2,
            "{name}: starts with no comment saying what it does"
        );
        let header = header.join("\n");
        let named: Vec<&str> = NEMESES
            .iter()
            .copied()
            .filter(|nemesis| header.contains(&format!("`{nemesis}`")))
            .collect();
        assert!(
            !named.is_empty(),
            "{name}: the top comment names no local nemesis (one of {NEMESES:?}) in backquotes"
        );
    }
}

#[test]
fn the_readme_maps_every_manifest_and_says_how_to_apply_it() {
    let readme_path = mesh_dir().join("README.md");
    let readme = std::fs::read_to_string(&readme_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", readme_path.display()));
    for (name, _) in manifests() {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "chaos/mesh/README.md has no table row for {name}"
        );
    }
    assert!(readme.contains("kubectl apply -f chaos/mesh/"));
    assert!(readme.contains("mesh_manifests_follow_the_chaos_mesh_schema"));
}

#[test]
fn no_two_experiments_share_a_kind_and_name() {
    let mut seen = BTreeMap::new();
    let mut count = 0;
    for (file, text) in manifests() {
        for doc in documents(&text).unwrap_or_else(|e| panic!("{file}: {e}")) {
            let kind = lookup(&doc, "kind")
                .and_then(Value::as_str)
                .map(str::to_string);
            let name = lookup(&doc, "metadata.name")
                .and_then(Value::as_str)
                .map(str::to_string);
            count += 1;
            if let Some(earlier) = seen.insert((kind.clone(), name.clone()), file.clone()) {
                panic!("{file} and {earlier} both define {kind:?} {name:?}");
            }
        }
    }
    assert_eq!(seen.len(), count);
}

// ---------------------------------------------------------------------------------------------
// The validator can fail: known-good fixtures pass, and each deliberate mistake is caught.

const GOOD_POD_KILL: &str = "\
apiVersion: chaos-mesh.org/v1alpha1
kind: PodChaos
metadata:
  name: fixture-pod-kill
  namespace: coffer
spec:
  action: pod-kill
  mode: fixed
  value: \"2\"
  selector:
    namespaces: [coffer]
    labelSelectors:
      app.kubernetes.io/name: coffer
";

const GOOD_PARTITION: &str = "\
apiVersion: chaos-mesh.org/v1alpha1
kind: NetworkChaos
metadata:
  name: fixture-partition
  namespace: coffer
spec:
  action: partition
  mode: one
  selector:
    namespaces: [coffer]
    labelSelectors:
      app.kubernetes.io/name: coffer
  direction: both
  target:
    mode: all
    selector:
      namespaces: [coffer]
      labelSelectors:
        app.kubernetes.io/name: coffer
  duration: 1m30s
";

const GOOD_DELAY: &str = "\
apiVersion: chaos-mesh.org/v1alpha1
kind: NetworkChaos
metadata:
  name: fixture-delay
  namespace: coffer
spec:
  action: delay
  mode: all
  selector:
    namespaces: [coffer]
    labelSelectors:
      app.kubernetes.io/name: coffer
  delay:
    latency: 100ms
    correlation: \"25\"
    jitter: 1.5ms
  duration: 30s
";

const GOOD_IO: &str = "\
apiVersion: chaos-mesh.org/v1alpha1
kind: IOChaos
metadata:
  name: fixture-io
  namespace: coffer
spec:
  action: fault
  mode: one
  selector:
    namespaces: [coffer]
    labelSelectors:
      app.kubernetes.io/name: coffer
  volumePath: /var/lib/coffer
  path: /var/lib/coffer/**/*
  errno: 5
  percent: 50
  methods: [fsync, write]
  duration: 30s
";

const GOOD_TIME: &str = "\
apiVersion: chaos-mesh.org/v1alpha1
kind: TimeChaos
metadata:
  name: fixture-time
  namespace: coffer
spec:
  mode: one
  selector:
    namespaces: [coffer]
    labelSelectors:
      app.kubernetes.io/name: coffer
  timeOffset: -5m
  clockIds: [CLOCK_REALTIME]
  duration: 30s
";

const GOOD_WORKFLOW: &str = "\
apiVersion: chaos-mesh.org/v1alpha1
kind: Workflow
metadata:
  name: fixture-workflow
  namespace: coffer
spec:
  entry: sequence
  templates:
    - name: sequence
      templateType: Serial
      deadline: 5m
      children: [kill, rest, cut]
    - name: kill
      templateType: PodChaos
      deadline: 10s
      podChaos:
        action: pod-kill
        mode: one
        selector:
          namespaces: [coffer]
          labelSelectors:
            app.kubernetes.io/name: coffer
    - name: rest
      templateType: Suspend
      deadline: 30s
    - name: cut
      templateType: NetworkChaos
      deadline: 30s
      networkChaos:
        action: partition
        mode: one
        selector:
          namespaces: [coffer]
          labelSelectors:
            app.kubernetes.io/name: coffer
        direction: both
        target:
          mode: all
          selector:
            namespaces: [coffer]
            labelSelectors:
              app.kubernetes.io/name: coffer
";

const FIXTURES: &[(&str, &str)] = &[
    ("pod-kill", GOOD_POD_KILL),
    ("partition", GOOD_PARTITION),
    ("delay", GOOD_DELAY),
    ("io", GOOD_IO),
    ("time", GOOD_TIME),
    ("workflow", GOOD_WORKFLOW),
];

/// The problems of `fixture` with the first `from` replaced by `to` (which must occur).
fn problems_after(fixture: &str, from: &str, to: &str) -> Vec<String> {
    assert!(
        fixture.contains(from),
        "the fixture has no {from:?} to replace"
    );
    let broken = fixture.replacen(from, to, 1);
    assert_ne!(broken, fixture);
    check_text(&broken)
}

/// The problems of `fixture` after `edit` changed its parsed form.
fn problems_after_edit(fixture: &str, edit: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut doc: Value = serde_yaml::from_str(fixture).expect("fixture parses");
    let before = doc.clone();
    edit(&mut doc);
    assert_ne!(doc, before, "the edit changed nothing");
    check_text(&serde_yaml::to_string(&doc).expect("serializes"))
}

fn spec_of(doc: &mut Value) -> &mut Mapping {
    doc.get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .expect("a spec mapping")
}

fn assert_rejected(problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "expected a problem mentioning {needle:?}, got {problems:#?}"
    );
}

#[test]
fn the_known_good_fixtures_pass() {
    for (name, fixture) in FIXTURES {
        assert_eq!(check_text(fixture), Vec::<String>::new(), "fixture {name}");
    }
    // Several documents in one file are each checked.
    let two = format!("{GOOD_POD_KILL}---\n{GOOD_TIME}");
    assert_eq!(documents(&two).expect("parses").len(), 2);
    assert_eq!(check_text(&two), Vec::<String>::new());
}

#[test]
fn a_bad_document_after_a_good_one_is_caught() {
    let two = format!(
        "{GOOD_POD_KILL}---\n{}",
        GOOD_TIME.replace("timeOffset: -5m", "timeOffset: five minutes")
    );
    let problems = check_text(&two);
    assert_rejected(&problems, "document 2: spec.timeOffset");
    assert!(problems.iter().all(|p| !p.starts_with("document 1")));
}

#[test]
fn bad_actions_are_rejected() {
    let problems = problems_after(GOOD_POD_KILL, "action: pod-kill", "action: pod-kil");
    assert_rejected(&problems, "unknown action `pod-kil`");
    let problems = problems_after(GOOD_PARTITION, "action: partition", "action: blackhole");
    assert_rejected(&problems, "unknown action `blackhole`");
    let problems = problems_after(GOOD_IO, "action: fault", "action: eio");
    assert_rejected(&problems, "unknown action `eio`");
    let problems = problems_after_edit(GOOD_POD_KILL, |doc| {
        spec_of(doc).remove("action");
    });
    assert_rejected(&problems, "spec.action: required but missing");
}

#[test]
fn a_missing_or_foreign_selector_is_rejected() {
    let problems = problems_after_edit(GOOD_POD_KILL, |doc| {
        spec_of(doc).remove("selector");
    });
    assert_rejected(&problems, "spec.selector: required but missing");

    let problems = problems_after(
        GOOD_POD_KILL,
        "app.kubernetes.io/name: coffer",
        "app.kubernetes.io/name: etcd",
    );
    assert_rejected(&problems, "spec.selector.labelSelectors: must select");

    let problems = problems_after(
        GOOD_POD_KILL,
        "namespaces: [coffer]",
        "namespaces: [default]",
    );
    assert_rejected(&problems, "spec.selector.namespaces: must be [coffer]");

    let problems = problems_after(GOOD_POD_KILL, "labelSelectors:", "labelSelector:");
    assert_rejected(&problems, "unknown key `labelSelector`");

    // The partition's target is a selector too.
    let problems = problems_after(
        GOOD_PARTITION,
        "      app.kubernetes.io/name: coffer\n  duration",
        "      app: coffer\n  duration",
    );
    assert_rejected(
        &problems,
        "spec.target.selector.labelSelectors: must select",
    );
}

#[test]
fn bad_modes_and_values_are_rejected() {
    let problems = problems_after(GOOD_POD_KILL, "mode: fixed", "mode: two");
    assert_rejected(&problems, "unknown mode `two`");
    let problems = problems_after_edit(GOOD_POD_KILL, |doc| {
        spec_of(doc).remove("value");
    });
    assert_rejected(&problems, "spec.value: required with mode `fixed`");
    let problems = problems_after(GOOD_POD_KILL, "value: \"2\"", "value: \"two\"");
    assert_rejected(&problems, "is not an integer");
    let problems = problems_after(GOOD_POD_KILL, "value: \"2\"", "value: 2");
    assert_rejected(&problems, "spec.value: expected a string");
    let problems = problems_after(
        GOOD_POD_KILL,
        "mode: fixed\n  value: \"2\"",
        "mode: fixed-percent\n  value: \"150\"",
    );
    assert_rejected(&problems, "out of range 1..=100");
}

#[test]
fn bad_durations_are_rejected() {
    for bad in ["30", "30 s", "1h30", "thirty seconds", "-30s", "0", "30d"] {
        let problems = problems_after(
            GOOD_PARTITION,
            "duration: 1m30s",
            &format!("duration: \"{bad}\""),
        );
        assert_rejected(&problems, "spec.duration");
    }
    let problems = problems_after_edit(GOOD_PARTITION, |doc| {
        spec_of(doc).remove("duration");
    });
    assert_rejected(&problems, "spec.duration: required");
    for bad in ["100", "fast", "1m30s", "-100ms", ".5ms"] {
        let problems = problems_after(GOOD_DELAY, "latency: 100ms", &format!("latency: \"{bad}\""));
        assert_rejected(&problems, "spec.delay.latency");
    }
    let problems = problems_after(GOOD_DELAY, "correlation: \"25\"", "correlation: \"250\"");
    assert_rejected(&problems, "spec.delay.correlation");
    let problems = problems_after(GOOD_TIME, "timeOffset: -5m", "timeOffset: 5 minutes ago");
    assert_rejected(&problems, "spec.timeOffset: invalid Go duration");
    let problems = problems_after(GOOD_WORKFLOW, "deadline: 30s", "deadline: soon");
    assert_rejected(&problems, "deadline: invalid Go duration");
}

#[test]
fn unknown_keys_are_rejected_at_every_level() {
    let problems = problems_after(GOOD_PARTITION, "duration: 1m30s", "durration: 1m30s");
    assert_rejected(&problems, "unknown key `durration`");
    let problems = problems_after(GOOD_PARTITION, "direction: both", "directions: both");
    assert_rejected(&problems, "unknown key `directions`");
    let problems = problems_after(GOOD_DELAY, "jitter: 1.5ms", "jiter: 1.5ms");
    assert_rejected(&problems, "spec.delay: unknown key `jiter`");
    let problems = problems_after(GOOD_IO, "volumePath:", "volumepath:");
    assert_rejected(&problems, "unknown key `volumepath`");
    let problems = problems_after(GOOD_POD_KILL, "metadata:", "metdata:");
    assert_rejected(&problems, "unknown key `metdata`");
    let problems = problems_after(GOOD_WORKFLOW, "deadline: 10s", "deadlin: 10s");
    assert_rejected(&problems, "templates[kill]: unknown key `deadlin`");
    // A key another kind has is still unknown here.
    let problems = problems_after(GOOD_TIME, "duration: 30s", "duration: 30s\n  direction: to");
    assert_rejected(&problems, "unknown key `direction`");
}

#[test]
fn bad_top_level_fields_are_rejected() {
    let problems = problems_after(
        GOOD_POD_KILL,
        "apiVersion: chaos-mesh.org/v1alpha1",
        "apiVersion: chaos-mesh.org/v1",
    );
    assert_rejected(&problems, "apiVersion");
    let problems = problems_after(GOOD_POD_KILL, "kind: PodChaos", "kind: PodChoas");
    assert_rejected(&problems, "unknown kind `PodChoas`");
    let problems = problems_after(GOOD_POD_KILL, "namespace: coffer", "namespace: default");
    assert_rejected(&problems, "metadata.namespace");
    let problems = problems_after(
        GOOD_POD_KILL,
        "name: fixture-pod-kill",
        "name: Fixture_Pod_Kill",
    );
    assert_rejected(&problems, "metadata.name");
    assert_rejected(&check_text("just a string"), "expected a mapping");
    assert_rejected(&check_text("# only a comment\n"), "no document");
    assert_rejected(&check_text("spec: [unclosed"), "not YAML");
}

#[test]
fn network_direction_and_target_are_checked() {
    let problems = problems_after(GOOD_PARTITION, "direction: both", "direction: sideways");
    assert_rejected(&problems, "unknown direction `sideways`");
    let problems = problems_after_edit(GOOD_PARTITION, |doc| {
        spec_of(doc).remove("target");
    });
    assert_rejected(&problems, "spec.target: required with action partition");
    let problems = problems_after(
        GOOD_DELAY,
        "action: delay",
        "action: delay\n  direction: both",
    );
    assert_rejected(&problems, "need a target for netem actions");
    let problems = problems_after_edit(GOOD_DELAY, |doc| {
        spec_of(doc).remove("delay");
    });
    assert_rejected(&problems, "spec.delay: required with action delay");
    let problems = problems_after(GOOD_DELAY, "action: delay", "action: loss");
    assert_rejected(&problems, "spec.delay: has no effect with action loss");
}

#[test]
fn io_chaos_fields_are_checked() {
    let problems = problems_after(GOOD_IO, "errno: 5", "errno: 0");
    assert_rejected(&problems, "spec.errno");
    let problems = problems_after_edit(GOOD_IO, |doc| {
        spec_of(doc).remove("errno");
    });
    assert_rejected(&problems, "spec.errno: required with action fault");
    let problems = problems_after(GOOD_IO, "percent: 50", "percent: 150");
    assert_rejected(&problems, "spec.percent");
    let problems = problems_after(GOOD_IO, "methods: [fsync, write]", "methods: [fsyncc]");
    assert_rejected(&problems, "unknown I/O method `fsyncc`");
    let problems = problems_after(GOOD_IO, "volumePath: /var/lib/coffer", "volumePath: /data");
    assert_rejected(&problems, "spec.volumePath");
    let problems = problems_after(GOOD_IO, "path: /var/lib/coffer/**/*", "path: /etc/**/*");
    assert_rejected(&problems, "is not under volumePath");
}

#[test]
fn time_chaos_fields_are_checked() {
    let problems = problems_after(GOOD_TIME, "clockIds: [CLOCK_REALTIME]", "clockIds: [WALL]");
    assert_rejected(&problems, "unknown clock id `WALL`");
    let problems = problems_after(GOOD_TIME, "timeOffset: -5m", "timeOffset: \"0\"");
    assert_rejected(&problems, "zero changes nothing");
    let problems = problems_after_edit(GOOD_TIME, |doc| {
        spec_of(doc).remove("timeOffset");
    });
    assert_rejected(&problems, "spec.timeOffset: required but missing");
}

#[test]
fn workflow_structure_is_checked() {
    let problems = problems_after(
        GOOD_WORKFLOW,
        "children: [kill, rest, cut]",
        "children: [kill, rest, cutt]",
    );
    assert_rejected(&problems, "names a template that does not exist: \"cutt\"");
    // The template no child names any more is reported too.
    assert_rejected(&problems, "templates[cut]: not reachable from the entry");

    let problems = problems_after(GOOD_WORKFLOW, "entry: sequence", "entry: sequense");
    assert_rejected(
        &problems,
        "spec.entry: names a template that does not exist",
    );

    let problems = problems_after(GOOD_WORKFLOW, "      deadline: 10s\n", "");
    assert_rejected(&problems, "templates[kill].deadline: required");

    let problems = problems_after(GOOD_WORKFLOW, "      podChaos:", "      networkChaos:");
    assert_rejected(
        &problems,
        "templates[kill].podChaos: required with templateType PodChaos",
    );
    assert_rejected(
        &problems,
        "a NetworkChaos spec in a template of type PodChaos",
    );

    let problems = problems_after(
        GOOD_WORKFLOW,
        "templateType: Suspend",
        "templateType: Sleep",
    );
    assert_rejected(&problems, "unknown templateType `Sleep`");

    let problems = problems_after(GOOD_WORKFLOW, "deadline: 5m", "deadline: 50s");
    assert_rejected(&problems, "cuts its children short");

    let problems = problems_after(GOOD_WORKFLOW, "- name: rest", "- name: kill");
    assert_rejected(&problems, "a second template named \"kill\"");

    let problems = problems_after(
        GOOD_WORKFLOW,
        "children: [kill, rest, cut]",
        "children: [kill, rest, cut, sequence]",
    );
    assert_rejected(&problems, "is part of a cycle");

    let problems = problems_after(GOOD_WORKFLOW, "      deadline: 30s\n", "");
    assert_rejected(&problems, "templates[rest].deadline: required");

    let problems = problems_after(GOOD_WORKFLOW, "      children: [kill, rest, cut]\n", "");
    assert_rejected(
        &problems,
        "templates[sequence].children: a Serial or Parallel",
    );

    // The embedded spec is checked like a standalone one.
    let problems = problems_after(GOOD_WORKFLOW, "direction: both", "direction: across");
    assert_rejected(&problems, "templates[cut].networkChaos.direction");
}

#[test]
fn go_durations_parse_as_go_parses_them() {
    let s = 1_000_000_000_i128;
    assert_eq!(parse_go_duration("30s"), Ok(30 * s));
    assert_eq!(parse_go_duration("1m30s"), Ok(90 * s));
    assert_eq!(parse_go_duration("100ms"), Ok(100_000_000));
    assert_eq!(parse_go_duration("2h45m"), Ok((2 * 3600 + 45 * 60) * s));
    assert_eq!(parse_go_duration("1.5h"), Ok(5400 * s));
    assert_eq!(parse_go_duration("-5m"), Ok(-300 * s));
    assert_eq!(parse_go_duration("+5m"), Ok(300 * s));
    assert_eq!(parse_go_duration("-10m100ns"), Ok(-(600 * s + 100)));
    assert_eq!(parse_go_duration("300\u{b5}s"), Ok(300_000));
    assert_eq!(parse_go_duration("300us"), Ok(300_000));
    assert_eq!(parse_go_duration(".5s"), Ok(s / 2));
    assert_eq!(parse_go_duration("1.s"), Ok(s));
    assert_eq!(parse_go_duration("0"), Ok(0));
    assert_eq!(parse_go_duration("-0"), Ok(0));
    assert_eq!(parse_go_duration("2562047h"), Ok(2_562_047 * 3600 * s));
    for bad in [
        "", "-", "+", "5", "s", "1x", "1m30", "30 s", ".s", "--5s", "5s ", "1d", "2562048h",
    ] {
        assert!(
            parse_go_duration(bad).is_err(),
            "{bad:?} should not parse as a Go duration"
        );
    }
}

#[test]
fn tc_latencies_take_one_number_and_one_unit() {
    for good in ["100ms", "1.5ms", "0ms", "2s", "10us"] {
        assert!(is_tc_duration(good), "{good:?}");
    }
    for bad in [
        "100", "ms", "1m30s", "-100ms", ".5ms", "1.ms", "100 ms", "100µs",
    ] {
        assert!(!is_tc_duration(bad), "{bad:?}");
    }
}
