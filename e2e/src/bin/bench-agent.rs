//! bench-agent: what the overlay agent costs and delivers, on namespaces it creates.
//!
//! 1. Change latency: a remote node (node record + block) is written to the store; the
//!    time until its block route is in the kernel of a node, p50/p99 over --changes.
//! 2. Initial sync: with --sizes remote nodes registered (default 1000 and 10000), the
//!    time from starting an agent to all their routes being in its kernel, its RSS,
//!    and its idle CPU over --idle-seconds.
//! 3. Throughput: cross-node pod-to-pod TCP (iperf3) against node-to-node on the
//!    underlay, in the same run, both ends pinned to one vCPU.
//!
//! Fake remote nodes sit in 198.18.0.0/15 (the benchmarking range) and own blocks in
//! 10.128.0.0/10; no packet is ever sent to them.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use calyx_dataplane::overlay::KernelEvent;
use calyx_e2e::cluster::{Cluster, ClusterSpec, POOL_V4};
use calyx_e2e::lab::{privileged, sh};
use calyx_ipam::model::{block_key, node_key, Block, NodeRecord};
use calyx_ipam::store::{file::FileStore, Expect, Store, Write};
use ipnetwork::IpNetwork;

struct Args {
    plugin: PathBuf,
    agent: PathBuf,
    changes: usize,
    sizes: Vec<usize>,
    idle_seconds: u64,
    iperf_seconds: u64,
    /// Run only this section: latency, sync or throughput.
    only: Option<String>,
    /// Alternating rounds of the throughput comparison (the median is kept).
    rounds: usize,
    /// Extra agent flags (e.g. --no-firewall, to see what the rules cost).
    agent_args: Vec<String>,
}

fn main() -> Result<()> {
    let mut args = Args {
        plugin: "target/release/calyx".into(),
        agent: "target/release/calyx-agent".into(),
        changes: 100,
        sizes: vec![1000, 10000],
        idle_seconds: 10,
        iperf_seconds: 5,
        rounds: 3,
        only: None,
        agent_args: Vec::new(),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        let mut value = || argv.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--plugin" => args.plugin = value()?.into(),
            "--agent" => args.agent = value()?.into(),
            "--changes" => args.changes = value()?.parse()?,
            "--sizes" => {
                args.sizes = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--idle-seconds" => args.idle_seconds = value()?.parse()?,
            "--iperf-seconds" => args.iperf_seconds = value()?.parse()?,
            "--only" => args.only = Some(value()?),
            "--rounds" => args.rounds = value()?.parse()?,
            "--agent-arg" => args.agent_args.push(value()?),
            other => {
                bail!("unknown argument {other}; see the header of e2e/src/bin/bench-agent.rs")
            }
        }
    }
    if !privileged() {
        bail!("bench-agent needs root and network namespaces");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let wanted = |section: &str| args.only.as_deref().is_none_or(|only| only == section);
    if wanted("latency") {
        latency_section(&args, &runtime)?;
    }
    if wanted("sync") {
        sync_section(&args, &runtime)?;
    }
    if wanted("throughput") {
        throughput_section(&args)?;
    }
    Ok(())
}

fn latency_section(args: &Args, runtime: &tokio::runtime::Runtime) -> Result<()> {
    println!("== change latency: remote node registered -> its block route in the kernel");
    let latencies = change_latency(args, runtime)?;
    let (p50, p99) = (percentile(&latencies, 50), percentile(&latencies, 99));
    println!(
        "  {} changes: p50 {:.1} ms, p99 {:.1} ms (goal p99 < 100 ms)",
        latencies.len(),
        ms(p50),
        ms(p99)
    );

    Ok(())
}

fn sync_section(args: &Args, runtime: &tokio::runtime::Runtime) -> Result<()> {
    println!("== initial sync with many remote nodes");
    println!(
        "  {:>7} {:>12} {:>10} {:>14}",
        "nodes", "sync", "RSS", "idle CPU"
    );
    for &n in &args.sizes {
        let r = initial_sync(args, runtime, n)?;
        println!(
            "  {:>7} {:>9.0} ms {:>7.1} MiB {:>12.2} %",
            n,
            ms(r.sync),
            r.rss_kib as f64 / 1024.0,
            r.idle_cpu_percent
        );
    }
    println!("  goals: 10,000 nodes synced in < 1 s, RSS < 100 MiB");
    Ok(())
}

fn throughput_section(args: &Args) -> Result<()> {
    println!(
        "== throughput: iperf3 TCP, 1 stream, {} s, both ends on CPU 0",
        args.iperf_seconds
    );
    let t = throughput(args)?;
    let gbit = |bps: f64| bps / 1e9;
    println!("  medians of {} alternating rounds:", args.rounds);
    println!(
        "  node-to-node underlay:               {:>6.2} Gbit/s",
        gbit(t.underlay)
    );
    println!(
        "  pod-to-pod, hand-built VXLAN (floor): {:>6.2} Gbit/s  ratio {:.2}",
        gbit(t.hand_built),
        t.hand_built / t.underlay
    );
    println!(
        "  pod-to-pod, Calyx:                   {:>6.2} Gbit/s  ratio {:.2} (goal >= 0.90)",
        gbit(t.calyx),
        t.calyx / t.underlay
    );
    println!("  Calyx / hand-built: {:.2}", t.calyx / t.hand_built);
    Ok(())
}

/// Tears a cluster down however the benchmark ends.
struct Guard(String);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Cluster::destroy(&self.0);
    }
}

fn spec(args: &Args, prefix: &str, nodes: usize, agent: bool) -> ClusterSpec {
    ClusterSpec {
        prefix: prefix.into(),
        plugin: args.plugin.clone(),
        agent: agent.then(|| args.agent.clone()),
        pools: vec![POOL_V4.into()],
        block_size: None,
        // Fake nodes never heartbeat: keep them "live" for the whole run.
        agent_args: ["--node-timeout-seconds", "86400"]
            .map(String::from)
            .into_iter()
            .chain(args.agent_args.iter().cloned())
            .collect(),
        nodes,
        etcd: false,
    }
}

/// The records of fake remote node `i`: a node and one block.
fn fake_node(i: usize) -> (NodeRecord, Block) {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i as u32) * 64;
    let cidr = IpNetwork::new(IpAddr::V4(Ipv4Addr::from(base)), 26).expect("valid");
    let underlay = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32 + 1);
    let name = format!("fake{i}");
    let mac = [0x02, 0xfa, (i >> 16) as u8, (i >> 8) as u8, i as u8, 0x01];
    let record = NodeRecord {
        name: name.clone(),
        underlay_ip: IpAddr::V4(underlay),
        vtep_ipv4: Some(cidr.ip()),
        vtep_ipv6: None,
        vtep_mac: calyx_dataplane::format_mac(&mac),
        heartbeat: 1,
    };
    (record, Block::new(cidr, "bench", &name))
}

fn fake_writes(range: std::ops::Range<usize>) -> Vec<Write> {
    range
        .flat_map(|i| {
            let (record, block) = fake_node(i);
            [
                Write::Put {
                    key: node_key(&record.name),
                    value: serde_json::to_string(&record).expect("serialises"),
                    expect: Expect::Absent,
                },
                Write::Put {
                    key: block_key(&block.cidr),
                    value: serde_json::to_string(&block).expect("serialises"),
                    expect: Expect::Absent,
                },
            ]
        })
        .collect()
}

/// Route-add events in a namespace, timestamped as they arrive.
fn watch_routes(netns: &str) -> Result<mpsc::Receiver<(Instant, IpAddr)>> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> Result<()> {
        netns_rs::get_from_path(&path)?.enter()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut events = calyx_dataplane::overlay::monitor()?;
            ready_tx.send(()).ok();
            while let Some(event) = events.recv().await {
                if let KernelEvent::Route {
                    deleted: false,
                    destination: Some((ip, _)),
                    ..
                } = event
                {
                    if tx.send((Instant::now(), ip)).is_err() {
                        break;
                    }
                }
            }
            Ok::<(), anyhow::Error>(())
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("route monitor did not start")?;
    Ok(rx)
}

fn change_latency(args: &Args, rt: &tokio::runtime::Runtime) -> Result<Vec<Duration>> {
    let prefix = "cyxbench-lat";
    let _ = Cluster::destroy(prefix);
    let _guard = Guard(prefix.into());
    let cluster = Cluster::create(&spec(args, prefix, 1, true))?;
    let store = FileStore::new(cluster.state_dir().join("store"));
    let routes = watch_routes(&cluster.nodes[0].netns)?;
    let mut latencies = Vec::new();
    for i in 0..args.changes {
        let block_ip = fake_node(i).1.cidr.ip();
        let started = Instant::now();
        rt.block_on(store.commit(fake_writes(i..i + 1)))?;
        loop {
            let (at, dst) = routes
                .recv_timeout(Duration::from_secs(5))
                .with_context(|| format!("no route for fake node {i} within 5 s"))?;
            if dst == block_ip {
                latencies.push(at.duration_since(started));
                break;
            }
        }
    }
    Ok(latencies)
}

struct SyncResult {
    sync: Duration,
    rss_kib: u64,
    idle_cpu_percent: f64,
}

fn initial_sync(args: &Args, rt: &tokio::runtime::Runtime, remote: usize) -> Result<SyncResult> {
    let prefix = "cyxbench-sync";
    let _ = Cluster::destroy(prefix);
    let _guard = Guard(prefix.into());
    let mut cluster = Cluster::create(&spec(args, prefix, 1, false))?;
    let store = FileStore::new(cluster.state_dir().join("store"));
    rt.block_on(store.commit(fake_writes(0..remote)))?;
    cluster.agent = Some(std::fs::canonicalize(&args.agent)?);
    let netns = cluster.nodes[0].netns.clone();
    let started = Instant::now();
    cluster.start_agent(0)?;
    let deadline = started + Duration::from_secs(120);
    loop {
        let out = sh(
            "ip",
            &[
                "-n",
                &netns,
                "-4",
                "route",
                "show",
                "proto",
                "201",
                "dev",
                "vxlan.calyx",
            ],
        );
        if out.status.success() && out.stdout.iter().filter(|b| **b == b'\n').count() >= remote {
            break;
        }
        if Instant::now() > deadline {
            bail!("agent did not sync {remote} nodes within 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync = started.elapsed();
    let pid: u32 =
        std::fs::read_to_string(cluster.node_state_dir(&cluster.nodes[0]).join("agent.pid"))?
            .trim()
            .parse()?;
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    // Let the startup burst settle, then measure CPU over an idle window.
    std::thread::sleep(Duration::from_secs(2));
    let cpu0 = cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_secs(args.idle_seconds));
    let cpu1 = cpu_ticks(pid)?;
    let ticks_per_second = 100.0;
    let idle_cpu_percent =
        (cpu1 - cpu0) as f64 / ticks_per_second / args.idle_seconds as f64 * 100.0;
    Ok(SyncResult {
        sync,
        rss_kib,
        idle_cpu_percent,
    })
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Medians of alternating iperf3 runs, bits per second.
struct Throughput {
    underlay: f64,
    hand_built: f64,
    calyx: f64,
}

/// Runs the three paths in turn, `rounds` times, so that the machine's drift hits all
/// of them alike: node to node on the underlay, pod to pod over a hand-built VXLAN (the
/// floor: no agent, no firewall rules), and pod to pod over Calyx.
fn throughput(args: &Args) -> Result<Throughput> {
    let prefix = "cyxbench-tput";
    let floor_prefix = "cyxbench-floor";
    for p in [prefix, floor_prefix] {
        let _ = Cluster::destroy(p);
    }
    let _guards = (Guard(prefix.into()), Guard(floor_prefix.into()));
    let floor = Cluster::create(&spec(args, floor_prefix, 2, false))?;
    let (floor_client, floor_server_ip) = hand_built_vxlan_pods(&floor)?;
    let mut cluster = Cluster::create(&spec(args, prefix, 2, true))?;
    cluster.add_pod(0, "a")?;
    cluster.add_pod(1, "b")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.reachability().iter().all(|(_, _, ok)| *ok) {
        if Instant::now() > deadline {
            bail!("pods do not reach each other");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (n1, n2) = (
        cluster.nodes[0].netns.clone(),
        cluster.nodes[1].netns.clone(),
    );
    let (pa, pb) = (cluster.pods[0].netns.clone(), cluster.pods[1].netns.clone());
    let pod_b_ip = cluster.pods[1].ips[0].clone();
    let underlay_ip = cluster.nodes[1].underlay_ip.clone();
    let floor_server = format!("{floor_prefix}-podb");
    let (mut under, mut hand, mut over) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        under.push(iperf(&n1, &n2, &underlay_ip, args.iperf_seconds)?);
        hand.push(iperf(
            &floor_client,
            &floor_server,
            &floor_server_ip,
            args.iperf_seconds,
        )?);
        over.push(iperf(&pa, &pb, &pod_b_ip, args.iperf_seconds)?);
    }
    Ok(Throughput {
        underlay: median(under),
        hand_built: median(hand),
        calyx: median(over),
    })
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The notes' reference topology, by hand with `ip`, on a cluster without agents: a
/// pod per node (/32, 169.254.1.1 gateway, MTU 1450, proxy_arp host veth, /32 host
/// route), `vxlan.floor` (VNI 4096, port 4789, nolearning) with a static neighbour,
/// FDB entry and `10.250.<n>.0/24 via <vtep> onlink` to the other node. No firewall
/// rules. Returns the client pod's namespace and the server pod's address.
fn hand_built_vxlan_pods(floor: &Cluster) -> Result<(String, String)> {
    let prefix = &floor.prefix;
    let mut script = String::from("set -e\n");
    for (i, node) in floor.nodes.iter().enumerate() {
        let (n, peer) = (i + 1, 2 - i);
        let ns = &node.netns;
        let pod = format!("{prefix}-pod{}", ["a", "b"][i]);
        let peer_underlay = &floor.nodes[1 - i].underlay_ip;
        script += &format!(
            "ip netns add {pod}
ip -n {pod} link set lo up
ip -n {ns} link add veth-pod type veth peer name eth0 netns {pod}
ip -n {ns} link set veth-pod mtu 1450 up
ip netns exec {ns} sysctl -qw net.ipv4.conf.veth-pod.proxy_arp=1 net.ipv4.neigh.veth-pod.proxy_delay=0
ip -n {pod} link set eth0 mtu 1450 up
ip -n {pod} addr add 10.250.{n}.2/32 dev eth0
ip -n {pod} route add 169.254.1.1 dev eth0 scope link
ip -n {pod} route add default via 169.254.1.1 dev eth0
ip -n {ns} route add 10.250.{n}.2/32 dev veth-pod scope link
ip -n {ns} link add vxlan.floor address 02:00:00:00:00:0{n} type vxlan id 4096 dstport 4789 local {local} nolearning dev eth0
ip -n {ns} link set vxlan.floor mtu 1450 up
ip -n {ns} addr add 10.250.{n}.0/32 dev vxlan.floor
ip -n {ns} neigh add 10.250.{peer}.0 lladdr 02:00:00:00:00:0{peer} dev vxlan.floor nud permanent
bridge -n {ns} fdb add 02:00:00:00:00:0{peer} dev vxlan.floor dst {peer_underlay} self permanent
ip -n {ns} route add 10.250.{peer}.0/24 via 10.250.{peer}.0 dev vxlan.floor onlink
",
            local = node.underlay_ip
        );
    }
    let out = sh("sh", &["-c", &script]);
    if !out.status.success() {
        bail!("hand-built VXLAN: {}", String::from_utf8_lossy(&out.stderr));
    }
    let client = format!("{prefix}-poda");
    let ping = sh(
        "ip",
        &["netns", "exec", &client, "ping", "-c1", "-w3", "10.250.2.2"],
    );
    if !ping.status.success() {
        bail!("hand-built VXLAN pods do not reach each other");
    }
    Ok((client, "10.250.2.2".into()))
}

fn iperf(client_ns: &str, server_ns: &str, server_ip: &str, seconds: u64) -> Result<f64> {
    let mut server = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{server_ns}"),
            "taskset",
            "-c",
            "0",
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5299",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{client_ns}"),
            "taskset",
            "-c",
            "0",
            "iperf3",
            "-c",
            server_ip,
            "-p",
            "5299",
        ])
        .args(["-t", &seconds.to_string(), "-J"])
        .output()?;
    let _ = server.wait();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| {
            format!(
                "iperf3 gave no result: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
}

fn percentile(samples: &[Duration], pct: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (sorted.len() * pct).div_ceil(100).max(1) - 1;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
