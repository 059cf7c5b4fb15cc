//! bench-proxy: what the service proxy costs, per mode, on namespaces it creates.
//!
//! For each mode (--modes, default nftables,iptables; ipvs needs a kernel with IPVS:
//! `make bench-proxy-vm` runs nftables and ipvs inside the VM) and size (--sizes, default 1000,
//! 10000,50000 Services x 2 endpoints, 10% NodePort), an agent starts in a fresh node
//! namespace with the Services in its --services-dir and an empty kernel:
//! - initial sync: the proxy's first sync (compute + write), and from the agent's first
//!   log line to its rules in the kernel;
//! - the floor beside it: the same final rules (as the kernel lists them) loaded into
//!   an empty namespace with one `nft -f` / `iptables-restore` / `ipvsadm -R` (IPVS
//!   mode: its virtual services and real servers; its sets and rules are not counted),
//!   in the same run;
//! - RSS after the sync, and its peak.
//!
//! At --change-size (default 10000): one endpoint change, source change -> kernel,
//! p50/p99 over --changes (default 100); and a restart (kill -9) with the rules present:
//! time to the first sync and how many kernel writes it made (goal: none).
//!
//! Services sit in 10.96.0.0/12, endpoints in 10.128.0.0/10; no packet is ever sent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use calyx_e2e::bench::{
    agent_log, agent_memory, epoch_now, field, floor, log_time, one_node, percentile,
    wait_for_line, write_list, Destroy,
};
use calyx_e2e::cluster::Cluster;
use calyx_e2e::lab::{must, privileged};
use serde_json::{json, Value};

struct Args {
    plugin: PathBuf,
    agent: PathBuf,
    modes: Vec<String>,
    sizes: Vec<usize>,
    change_size: usize,
    changes: usize,
}

fn main() -> Result<()> {
    let mut args = Args {
        plugin: "target/release/calyx".into(),
        agent: "target/release/calyx-agent".into(),
        modes: vec!["nftables".into(), "iptables".into()],
        sizes: vec![1000, 10_000, 50_000],
        change_size: 10_000,
        changes: 100,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        let mut value = || argv.next().with_context(|| format!("{arg} needs a value"));
        let list = |v: String| v.split(',').map(str::to_string).collect::<Vec<_>>();
        match arg.as_str() {
            "--plugin" => args.plugin = value()?.into(),
            "--agent" => args.agent = value()?.into(),
            "--modes" => args.modes = list(value()?),
            "--sizes" => {
                args.sizes = list(value()?)
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            "--change-size" => args.change_size = value()?.parse()?,
            "--changes" => args.changes = value()?.parse()?,
            other => {
                bail!("unknown argument {other}; see the header of e2e/src/bin/bench-proxy.rs")
            }
        }
    }
    if !privileged() {
        bail!("bench-proxy needs root and network namespaces");
    }
    for mode in &args.modes {
        println!("\n== {mode} mode ==");
        println!(
            "| Services | first sync | start -> programmed | floor: one {} of the same rules | ratio | RSS | peak RSS |",
            match mode.as_str() {
                "nftables" => "nft -f",
                "ipvs" => "ipvsadm -R",
                _ => "iptables-restore",
            }
        );
        println!("|---|---|---|---|---|---|---|");
        let mut sizes = args.sizes.clone();
        if !sizes.contains(&args.change_size) {
            sizes.push(args.change_size);
        }
        for &n in &sizes {
            run_size(&args, mode, n)?;
        }
    }
    println!(
        "\ngoals: nftables first sync <= 1 s at 10,000 and <= 5 s at 50,000; iptables <= 3 s at 10,000;\n\
         restart ready <= 2 s writing nothing; one change p99 <= 30 ms at 10,000; RSS <= 100 MiB at 10,000;\n\
         ipvs first sync <= 5 s and one change p99 <= 50 ms at 10,000 (in the VM: as ratios to nftables there)"
    );
    Ok(())
}

fn ip(base: u32, i: usize) -> String {
    std::net::Ipv4Addr::from(base + i as u32).to_string()
}

const SERVICES_BASE: u32 = 0x0A60_0000; // 10.96.0.0
const ENDPOINTS_BASE: u32 = 0x0A80_0000; // 10.128.0.0

/// Service `i` with two endpoints (`shift` moves the second one: a change).
fn objects(i: usize, shift: usize) -> Vec<Value> {
    let name = format!("svc-{i}");
    let node_port = i.is_multiple_of(10).then_some(30000 + i / 10);
    let mut port = json!({"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080});
    if let Some(np) = node_port {
        port["nodePort"] = json!(np);
    }
    let endpoints: Vec<Value> = [2 * i, 2 * i + 1 + shift * 2_000_000]
        .iter()
        .map(|e| json!({"addresses": [ip(ENDPOINTS_BASE, *e)], "conditions": {"ready": true}, "nodeName": "node1"}))
        .collect();
    vec![
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "bench"},
               "spec": {"type": if node_port.is_some() { "NodePort" } else { "ClusterIP" },
                        "clusterIP": ip(SERVICES_BASE, i + 1), "ports": [port]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
               "metadata": {"name": format!("{name}-abcde"), "namespace": "bench",
                            "labels": {"kubernetes.io/service-name": name}},
               "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
               "endpoints": endpoints}),
    ]
}

/// Service 0 lives alone in churn.json (the one the change test rewrites); the rest in
/// files of 500.
fn write_services(dir: &Path, n: usize) -> Result<()> {
    write_list(dir, "churn.json", objects(0, 0))?;
    for (chunk, start) in (1..n).step_by(500).enumerate() {
        let items = (start..(start + 500).min(n))
            .flat_map(|i| objects(i, 0))
            .collect();
        write_list(dir, &format!("services-{chunk:04}.json"), items)?;
    }
    Ok(())
}

/// A "service proxy synced" log line: its time (s since the epoch) and fields.
struct Synced {
    at: f64,
    first: bool,
    writes: usize,
    elapsed_ms: f64,
}

fn synced(l: &str) -> Option<Synced> {
    if !l.contains("service proxy synced") {
        return None;
    }
    Some(Synced {
        at: log_time(l)?,
        first: field(l, "first") == Some("true"),
        writes: field(l, "writes")?.parse().ok()?,
        elapsed_ms: field(l, "elapsed_ms")?.parse().ok()?,
    })
}

/// Waits for a synced line after byte `from` of the log.
fn wait_synced(c: &Cluster, from: usize, timeout: Duration) -> Result<Synced> {
    wait_for_line(c, from, timeout, "proxy sync", synced)
}

/// The kernel's rules of `mode` in `netns`, in a form the loader takes back.
fn dump(mode: &str, netns: &str) -> String {
    if mode == "nftables" {
        let mut out = String::new();
        for family in ["ip", "ip6"] {
            out.push_str(&must(
                "ip",
                &[
                    "netns",
                    "exec",
                    netns,
                    "nft",
                    "list",
                    "table",
                    family,
                    "calyx-proxy",
                ],
            ));
        }
        out
    } else if mode == "ipvs" {
        must("ip", &["netns", "exec", netns, "ipvsadm", "-Sn"])
    } else {
        must("ip", &["netns", "exec", netns, "iptables-save"])
    }
}

fn run_size(args: &Args, mode: &str, n: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_services(dir.path(), n)?;
    let prefix = format!("bp{}", std::process::id());
    let _cleanup = Destroy(prefix.clone());
    let c = one_node(
        &prefix,
        &args.plugin,
        &args.agent,
        &[
            "--proxy-mode",
            mode,
            "--services-dir",
            dir.path().to_str().unwrap(),
            "--resync-seconds",
            "3600",
        ],
    )?;
    let first = wait_synced(&c, 0, Duration::from_secs(600))?;
    let log = agent_log(&c);
    let started = log.lines().next().and_then(log_time).unwrap_or(first.at);
    let (rss, peak) = agent_memory(&c)?;
    let netns = c.nodes[0].netns.clone();
    let floor_s = floor(mode, &dump(mode, &netns))?;
    let sync_s = first.elapsed_ms / 1e3;
    println!(
        "| {n} | {:.3} s | {:.3} s | {:.3} s | {:.2} | {:.0} MiB | {:.0} MiB |",
        sync_s,
        first.at - started,
        floor_s,
        sync_s / floor_s,
        rss,
        peak
    );
    if n != args.change_size {
        return Ok(());
    }

    // One endpoint change at a time, source change -> kernel.
    let mut latencies = Vec::new();
    for round in 0..args.changes {
        let from = agent_log(&c).len();
        let t0 = epoch_now();
        write_list(dir.path(), "churn.json", objects(0, (round + 1) % 2))?;
        let s = wait_synced(&c, from, Duration::from_secs(10))?;
        if s.writes == 0 {
            bail!("a change wrote nothing");
        }
        latencies.push((s.at - t0) * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| percentile(&latencies, p);
    println!(
        "  one endpoint change at {n}: p50 {:.1} ms, p99 {:.1} ms over {} changes (source file written -> rules in the kernel)",
        pct(0.5),
        pct(0.99),
        latencies.len()
    );

    print_log_tail(&c);

    // Restart with the rules present.
    let from = agent_log(&c).len();
    c.signal_agent(0, "KILL")?;
    let t0 = Instant::now();
    c.start_agent(0)?;
    let s = wait_synced(&c, from, Duration::from_secs(600))?;
    let to_sync = t0.elapsed().as_secs_f64();
    println!(
        "  restart (kill -9) with the rules present at {n}: first sync {:.3} s, start -> synced {:.3} s, kernel writes {} (first={})",
        s.elapsed_ms / 1e3,
        to_sync,
        s.writes,
        s.first
    );
    c.signal_agent(0, "KILL")?;
    print_log_tail(&c);
    Ok(())
}

/// BENCH_PROXY_LOG=N: the agent's last N log lines (CALYX_LOG=debug shows each phase).
fn print_log_tail(c: &Cluster) {
    if let Some(lines) = std::env::var("BENCH_PROXY_LOG")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        println!("{}", c.agent_log_tail(0, lines));
    }
}
