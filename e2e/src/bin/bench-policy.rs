//! bench-policy: what NetworkPolicy costs at scale, beside its floor, in one run.
//!
//! An agent (proxy off, policy on) starts in a fresh node namespace with an empty
//! kernel and a --services-dir of --pods Pods (default 10,000) in --namespaces
//! namespaces (default 100), 1 in 91 of them on the measured node (110 of 10,000), and
//! --policies NetworkPolicies (default 1,000) of ten shapes: default deny, pod and
//! namespace selectors alone and together, matchExpressions, named ports, port ranges,
//! ipBlocks with except, egress to pods and to ipBlocks, allow-all. It measures:
//! - start -> enforced: the agent's first log line to its first "network policy
//!   synced", and that sync itself;
//! - the floor beside it: the same final table (as the kernel lists it) loaded into an
//!   empty namespace with one `nft -f`, in the same run;
//! - RSS after the first sync, and its peak;
//! - changes, --changes of each kind in turn: a pod on another node relabelled (set
//!   elements only), a local pod relabelled, a policy edited, a local pod added (then
//!   removed): object file written -> table in the kernel, p50/p99 per kind, and the
//!   writes each took.
//!
//! Pod addresses sit in 10.128.0.0/10; no packet is ever sent. `make bench-cni` measures
//! ADD with a held pod beside one that is not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use calyx_e2e::bench::{
    agent_log, agent_memory, epoch_now, field, floor, log_time, one_node, percentile,
    wait_for_line, write_list, Destroy,
};
use calyx_e2e::cluster::Cluster;
use calyx_e2e::lab::{must, privileged};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "NetworkPolicy at scale: start -> enforced, changes, RSS, beside one nft -f")]
struct Args {
    /// The CNI plugin binary.
    #[arg(long, default_value = "target/release/calyx")]
    plugin: PathBuf,
    /// The agent binary.
    #[arg(long, default_value = "target/release/calyx-agent")]
    agent: PathBuf,
    /// Pods in the cluster.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Namespaces they are spread over (each gets policies/namespaces policies).
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// NetworkPolicies, spread evenly over the namespaces.
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// Changes of each kind.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// The agent's log filter (`info,calyx_agent::policy=debug` shows more; the agent
    /// log is printed at the end when it is not `info`).
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// The measured node holds one pod in this many.
const LOCAL_EVERY: usize = 91;
const PODS_BASE: u32 = 0x0A80_0000; // 10.128.0.0

fn node_of(i: usize) -> String {
    if i.is_multiple_of(LOCAL_EVERY) {
        "node1".into()
    } else {
        format!("elsewhere-{}", i % 50)
    }
}

fn pod(i: usize, namespaces: usize, app: usize) -> Value {
    let ip = std::net::Ipv4Addr::from(PODS_BASE + i as u32).to_string();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("p{i}"), "namespace": format!("ns-{}", i % namespaces),
                     "labels": {"app": format!("app-{app}"), "tier": format!("t{}", i % 3)}},
        "spec": {"nodeName": node_of(i), "containers": [{"name": "main", "ports": [
            {"name": "http", "containerPort": 8080 + (i % 2), "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
        ]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn namespace(n: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": format!("ns-{n}"), "labels": {
               "kubernetes.io/metadata.name": format!("ns-{n}"),
               "team": format!("team-{}", n % 10),
               "env": if n.is_multiple_of(2) { "prod" } else { "dev" }}}})
}

fn app(a: usize) -> Value {
    json!({"matchLabels": {"app": format!("app-{a}")}})
}

/// Policy `j` of namespace `n`; `port` moves the edited one's port.
fn policy(n: usize, j: usize, port: u16) -> Value {
    let spec = match j % 10 {
        0 => json!({"podSelector": {}, "ingress": []}),
        1 => {
            json!({"podSelector": app(1), "ingress": [{"from": [{"podSelector": app(2)}], "ports": [{"port": port}]}]})
        }
        2 => {
            json!({"podSelector": app(3), "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", n % 10)}}}], "ports": [{"port": "http"}]}]})
        }
        3 => {
            json!({"podSelector": app(4), "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}, "podSelector": app(5)}], "ports": [{"port": 8000, "endPort": 8100}]}]})
        }
        4 => {
            json!({"podSelector": {"matchLabels": {"tier": "t0"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.128.0.0/16", "except": ["10.128.1.0/24"]}}]}]})
        }
        5 => {
            json!({"podSelector": app(5), "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app-6", "app-7"]}]}}], "ports": [{"port": 53, "protocol": "UDP"}, {"port": "http"}]}]})
        }
        6 => {
            json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["t1"]}, {"key": "app", "operator": "Exists"}]}, "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}}, {"namespaceSelector": {}, "podSelector": app(8)}]}]})
        }
        7 => {
            json!({"podSelector": app(7), "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": "metrics"}]}]})
        }
        8 => {
            json!({"podSelector": app(8), "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]})
        }
        _ => json!({"podSelector": app(9), "ingress": [{}]}),
    };
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": format!("np-{j}"), "namespace": format!("ns-{n}")}, "spec": spec})
}

/// Pod 0 (on the measured node, in ns-0) and the added pod live in churn-pods.json,
/// pod 1 (on another node) in churn-remote.json, ns-0's policy np-1 in
/// churn-policies.json: the files the changes rewrite.
fn write_cluster(dir: &Path, args: &Args) -> Result<()> {
    write_list(
        dir,
        "namespaces.json",
        (0..args.namespaces).map(namespace).collect(),
    )?;
    write_list(dir, "churn-pods.json", vec![pod(0, args.namespaces, 1)])?;
    write_list(dir, "churn-remote.json", vec![pod(1, args.namespaces, 2)])?;
    for (chunk, start) in (2..args.pods).step_by(1000).enumerate() {
        let items = (start..(start + 1000).min(args.pods))
            .map(|i| pod(i, args.namespaces, i % 10))
            .collect();
        write_list(dir, &format!("pods-{chunk:03}.json"), items)?;
    }
    let per_namespace = args.policies / args.namespaces;
    let mut policies = Vec::new();
    for n in 0..args.namespaces {
        for j in 0..per_namespace {
            if (n, j) == (0, 1) {
                write_list(dir, "churn-policies.json", vec![policy(0, 1, 8080)])?;
            } else {
                policies.push(policy(n, j, 8080));
            }
        }
    }
    write_list(dir, "policies.json", policies)?;
    Ok(())
}

/// A "network policy synced" log line.
struct Synced {
    at: f64,
    writes: usize,
    elapsed_ms: f64,
    policies: usize,
    pods: usize,
}

fn synced(l: &str) -> Option<Synced> {
    if !l.contains("network policy synced") {
        return None;
    }
    Some(Synced {
        at: log_time(l)?,
        writes: field(l, "writes")?.parse().ok()?,
        elapsed_ms: field(l, "elapsed_ms")?.parse().ok()?,
        policies: field(l, "policies")?.parse().ok()?,
        pods: field(l, "pods")?.parse().ok()?,
    })
}

/// The first synced line after byte `from` of the log that wrote something.
fn wait_synced(c: &Cluster, from: usize, timeout: Duration) -> Result<Synced> {
    wait_for_line(c, from, timeout, "policy sync", |l| {
        synced(l).filter(|s| s.writes > 0)
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !privileged() {
        bail!("bench-policy needs root and network namespaces");
    }
    let dir = tempfile::tempdir()?;
    write_cluster(dir.path(), &args)?;
    let prefix = format!("bpol{}", std::process::id());
    let _cleanup = Destroy(prefix.clone());
    let c = one_node(
        &prefix,
        &args.plugin,
        &args.agent,
        &[
            "--proxy-mode",
            "off",
            "--network-policy",
            "on",
            "--services-dir",
            dir.path().to_str().unwrap(),
            "--resync-seconds",
            "3600",
            "--log-level",
            &args.log_level,
        ],
    )?;
    let first = wait_synced(&c, 0, Duration::from_secs(300))?;
    let log = agent_log(&c);
    let started = log.lines().next().and_then(log_time).unwrap_or(first.at);
    let (rss, peak) = agent_memory(&c)?;
    let netns = c.nodes[0].netns.clone();
    let table = must(
        "ip",
        &[
            "netns",
            "exec",
            &netns,
            "nft",
            "list",
            "table",
            "inet",
            "calyx-policy",
        ],
    );
    let floor_s = floor("nftables", &table)?;
    println!(
        "{} pods in {} namespaces ({} on this node), {} policies; the table as nft lists it: {} lines",
        args.pods,
        args.namespaces,
        args.pods.div_ceil(LOCAL_EVERY),
        args.policies,
        table.lines().count(),
    );
    println!("| measure | Calyx | floor: one nft -f of the same table | ratio |");
    println!("|---|---|---|---|");
    let sync_s = first.elapsed_ms / 1e3;
    println!(
        "| first sync ({} policies isolating {} local pods) | {:.3} s | {:.3} s | {:.2} |",
        first.policies,
        first.pods,
        sync_s,
        floor_s,
        sync_s / floor_s
    );
    println!(
        "| agent start -> enforced | {:.3} s | {:.3} s | {:.2} |",
        first.at - started,
        floor_s,
        (first.at - started) / floor_s
    );
    println!(
        "RSS after the first sync {:.0} MiB, peak {:.0} MiB",
        rss, peak
    );

    // Each kind of change in turn, each undone by the next of its kind.
    let kinds: [(&str, &str); 4] = [
        ("a pod on another node relabelled", "churn-remote.json"),
        ("a local pod relabelled", "churn-pods.json"),
        ("a policy edited", "churn-policies.json"),
        ("a local pod added or removed", "churn-pods.json"),
    ];
    println!("| change | p50 | p99 | writes (p50) | of which the sync itself (p50) |");
    println!("|---|---|---|---|---|");
    for (k, (what, file)) in kinds.iter().enumerate() {
        let mut latencies = Vec::new();
        let mut writes = Vec::new();
        let mut syncs = Vec::new();
        for round in 0..args.changes {
            let on = round % 2 == 0;
            let items = match k {
                // app-2 is a peer of app-1's policy, app-5 of app-4's.
                0 => vec![pod(1, args.namespaces, if on { 5 } else { 2 })],
                1 => vec![pod(0, args.namespaces, if on { 3 } else { 1 })],
                2 => vec![policy(0, 1, if on { 8081 } else { 8080 })],
                _ => {
                    let mut items = vec![pod(0, args.namespaces, 1)];
                    if on {
                        // A new pod of ns-0 on this node (its address is past every other pod).
                        let mut added = pod(LOCAL_EVERY * 40_000, args.namespaces, 3);
                        added["metadata"]["namespace"] = json!("ns-0");
                        items.push(added);
                    }
                    items
                }
            };
            let from = agent_log(&c).len();
            let t0 = epoch_now();
            write_list(dir.path(), file, items)?;
            let s = wait_synced(&c, from, Duration::from_secs(10))?;
            latencies.push((s.at - t0) * 1e3);
            writes.push(s.writes);
            syncs.push(s.elapsed_ms);
        }
        latencies.sort_by(f64::total_cmp);
        writes.sort();
        syncs.sort_by(f64::total_cmp);
        println!(
            "| {what} ({} changes) | {:.1} ms | {:.1} ms | {} | {:.1} ms |",
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            writes[writes.len() / 2],
            percentile(&syncs, 0.5)
        );
    }
    if args.log_level != "info" {
        println!("{}", c.agent_log_tail(0, 60));
    }
    println!(
        "\ngoals: enforced <= 1 s from start; a change p99 <= 30 ms (file written -> kernel); RSS <= 100 MiB"
    );
    Ok(())
}
