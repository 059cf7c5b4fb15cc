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
use calyx_e2e::cluster::{Cluster, ClusterSpec, POOL_V4};
use calyx_e2e::lab::{must, privileged, sh};
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

fn write_list(dir: &Path, file: &str, items: Vec<Value>) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": items}))?,
    )?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
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

fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let t: jiff::Timestamp = stamp.parse().ok()?;
    Some(t.as_microsecond() as f64 / 1e6)
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
}

fn synced_lines(log: &str) -> Vec<Synced> {
    log.lines()
        .filter(|l| l.contains("service proxy synced") && l.contains("writes="))
        .filter_map(|l| {
            Some(Synced {
                at: log_time(l)?,
                first: field(l, "first") == Some("true"),
                writes: field(l, "writes")?.parse().ok()?,
                elapsed_ms: field(l, "elapsed_ms")?.parse().ok()?,
            })
        })
        .collect()
}

fn agent_log(c: &Cluster) -> String {
    std::fs::read_to_string(c.node_state_dir(&c.nodes[0]).join("agent.log")).unwrap_or_default()
}

/// Waits for a synced line after byte `from` of the log.
fn wait_synced(c: &Cluster, from: usize, timeout: Duration) -> Result<Synced> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent_log(c);
        if let Some(s) = synced_lines(&log[from.min(log.len())..]).into_iter().next() {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "no proxy sync after {timeout:?}; log:\n{}",
                c.agent_log_tail(0, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn agent_pid(c: &Cluster) -> Result<u32> {
    let path = c.node_state_dir(&c.nodes[0]).join("agent.pid");
    Ok(std::fs::read_to_string(path)?.trim().parse()?)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
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

/// Seconds to load `rules` into a fresh namespace in one call.
fn floor(mode: &str, rules: &str) -> Result<f64> {
    let netns = format!("bench-floor-{}", std::process::id());
    must("ip", &["netns", "add", &netns]);
    let file = std::env::temp_dir().join(format!("{netns}.rules"));
    std::fs::write(&file, rules)?;
    // IPVS takes real servers only once the namespace has a local routing table.
    must("ip", &["-n", &netns, "link", "set", "lo", "up"]);
    let loader = match mode {
        "nftables" => "nft -f",
        "ipvs" => "ipvsadm -R <",
        _ => "iptables-restore <",
    };
    let started = Instant::now();
    let out = if mode == "nftables" {
        sh(
            "ip",
            &["netns", "exec", &netns, "nft", "-f", file.to_str().unwrap()],
        )
    } else {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "sh",
                "-c",
                &format!("{loader} {}", file.display()),
            ],
        )
    };
    let took = started.elapsed().as_secs_f64();
    sh("ip", &["netns", "del", &netns]);
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!(
            "floor load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

struct Destroy(String);

impl Drop for Destroy {
    fn drop(&mut self) {
        let _ = Cluster::destroy(&self.0);
    }
}

fn run_size(args: &Args, mode: &str, n: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_services(dir.path(), n)?;
    let prefix = format!("bp{}", std::process::id());
    let _cleanup = Destroy(prefix.clone());
    let spec = ClusterSpec {
        prefix: prefix.clone(),
        plugin: args.plugin.clone(),
        agent: Some(args.agent.clone()),
        pools: vec![POOL_V4.to_string()],
        block_size: None,
        agent_args: [
            "--proxy-mode",
            mode,
            "--services-dir",
            dir.path().to_str().unwrap(),
            "--resync-seconds",
            "3600",
        ]
        .map(String::from)
        .to_vec(),
        nodes: 1,
        etcd: false,
    };
    let c = Cluster::create(&spec)?;
    let first = wait_synced(&c, 0, Duration::from_secs(600))?;
    let log = agent_log(&c);
    let started = log.lines().next().and_then(log_time).unwrap_or(first.at);
    let pid = agent_pid(&c)?;
    let (rss, peak) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let netns = c.nodes[0].netns.clone();
    let floor_s = floor(mode, &dump(mode, &netns))?;
    let sync_s = first.elapsed_ms / 1e3;
    println!(
        "| {n} | {:.3} s | {:.3} s | {:.3} s | {:.2} | {:.0} MiB | {:.0} MiB |",
        sync_s,
        first.at - started,
        floor_s,
        sync_s / floor_s,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    if n != args.change_size {
        return Ok(());
    }

    // One endpoint change at a time, source change -> kernel.
    let mut latencies = Vec::new();
    for round in 0..args.changes {
        let from = agent_log(&c).len();
        let t0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        write_list(dir.path(), "churn.json", objects(0, (round + 1) % 2))?;
        let s = wait_synced(&c, from, Duration::from_secs(10))?;
        if s.writes == 0 {
            bail!("a change wrote nothing");
        }
        latencies.push((s.at - t0) * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
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
