//! Multi-node end-to-end tests: real node namespaces on an underlay bridge, the real
//! agent on each, pods wired by the real plugin, real packets. Each test builds its
//! own cluster under a unique prefix and removes it (agents included) when done.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use calyx_e2e::cluster::{Cluster, ClusterSpec, POOL_V4, POOL_V6};
use calyx_e2e::lab::{must, privileged, sh, wait_until};
use calyx_e2e::sockets::{connect_from, listen_in, transfer};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A cluster torn down when the test ends, however it ends.
struct TestCluster(Cluster);

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = Cluster::destroy(&self.0.prefix);
    }
}

impl std::ops::Deref for TestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl std::ops::DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.0
    }
}

fn binaries() -> (PathBuf, PathBuf) {
    calyx_e2e::cluster::binaries_beside(env!("CARGO_BIN_EXE_calyx-agent"))
}

/// `nodes` nodes with agents that resync every second and drop a silent node after 3 s.
fn cluster(nodes: usize, pools: &[&str], etcd: bool) -> Option<TestCluster> {
    cluster_with(nodes, pools, None, etcd)
}

/// `cluster`, with IPv4 blocks of `block_size` instead of /26.
fn cluster_with(
    nodes: usize,
    pools: &[&str],
    block_size: Option<u8>,
    etcd: bool,
) -> Option<TestCluster> {
    if !privileged() || (etcd && !calyx_e2e::etcd::available()) {
        return None;
    }
    let (plugin, agent) = binaries();
    let spec = ClusterSpec {
        prefix: format!(
            "cyxo{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ),
        plugin,
        agent: Some(agent),
        pools: pools.iter().map(|p| p.to_string()).collect(),
        block_size,
        agent_args: [
            "--resync-seconds",
            "1",
            "--heartbeat-seconds",
            "1",
            "--node-timeout-seconds",
            "3",
        ]
        .map(String::from)
        .to_vec(),
        nodes,
        etcd,
    };
    match Cluster::create(&spec) {
        Ok(c) => Some(TestCluster(c)),
        Err(e) => {
            let _ = Cluster::destroy(&spec.prefix);
            panic!("cluster: {e:#}");
        }
    }
}

fn all_reachable(c: &Cluster) -> bool {
    c.reachability().iter().all(|(_, _, ok)| *ok)
}

fn ip_of(c: &Cluster, pod: usize, v4: bool) -> IpAddr {
    c.pods[pod]
        .ips
        .iter()
        .map(|ip| ip.parse::<IpAddr>().unwrap())
        .find(|ip| ip.is_ipv4() == v4)
        .unwrap()
}

/// Two pods on each of `c`'s first two nodes: pods 0,1 on node 0 and 2,3 on node 1.
fn two_pods_per_node(c: &mut Cluster) {
    for n in 0..2 {
        for p in 0..2 {
            c.add_pod(n, &format!("n{n}p{p}")).unwrap();
        }
    }
}

fn pods_reach_each_other_across_nodes_over_ipv4_and_ipv6(etcd: bool) {
    let Some(mut c) = cluster(2, &[POOL_V4, POOL_V6], etcd) else {
        return;
    };
    two_pods_per_node(&mut c);
    wait_until(
        "all pods to reach each other",
        Duration::from_secs(10),
        || all_reachable(&c),
    );
    for v4 in [true, false] {
        for (from, to, port) in [(0, 1, 5001), (0, 2, 5002), (3, 1, 5003)] {
            let server = SocketAddr::new(ip_of(&c, to, v4), port);
            let (peer, got) =
                transfer(&c.pods[from].netns, &c.pods[to].netns, server, 1 << 20).unwrap();
            assert_eq!(got, 1 << 20);
            assert_eq!(
                peer.ip(),
                ip_of(&c, from, v4),
                "pod-to-pod traffic must keep the pod's source"
            );
        }
    }
}

fn ten_megabytes_cross_node_with_the_right_mtu(etcd: bool) {
    let Some(mut c) = cluster(2, &[POOL_V4], etcd) else {
        return;
    };
    two_pods_per_node(&mut c);
    wait_until("reachability", Duration::from_secs(10), || {
        all_reachable(&c)
    });
    let pod_link = must("ip", &["-n", &c.pods[0].netns, "link", "show", "eth0"]);
    let vxlan = must(
        "ip",
        &["-n", &c.nodes[0].netns, "link", "show", "vxlan.calyx"],
    );
    assert!(pod_link.contains("mtu 1450"), "{pod_link}");
    assert!(vxlan.contains("mtu 1450"), "{vxlan}");
    let server = SocketAddr::new(ip_of(&c, 2, true), 5100);
    let (_, got) = transfer(&c.pods[0].netns, &c.pods[2].netns, server, 10 << 20).unwrap();
    assert_eq!(got, 10 << 20);
}

fn pods_work_when_every_node_drops_forwarded_traffic_by_default(etcd: bool) {
    let Some(mut c) = cluster(2, &[POOL_V4], etcd) else {
        return;
    };
    for node in &c.nodes {
        must(
            "nsenter",
            &[
                &format!("--net=/run/netns/{}", node.netns),
                "iptables",
                "-w",
                "-P",
                "FORWARD",
                "DROP",
            ],
        );
    }
    two_pods_per_node(&mut c);
    wait_until(
        "reachability under FORWARD DROP",
        Duration::from_secs(10),
        || all_reachable(&c),
    );
    let server = SocketAddr::new(ip_of(&c, 2, true), 5200);
    let (_, got) = transfer(&c.pods[0].netns, &c.pods[2].netns, server, 1 << 20).unwrap();
    assert_eq!(got, 1 << 20);
}

fn routes_on(c: &Cluster, node: usize) -> String {
    must(
        "ip",
        &[
            "-n",
            &c.nodes[node].netns,
            "route",
            "show",
            "proto",
            "201",
            "dev",
            "vxlan.calyx",
        ],
    )
}

fn a_joining_node_is_reached_and_a_departed_node_is_dropped(etcd: bool) {
    let Some(mut c) = cluster(2, &[POOL_V4], etcd) else {
        return;
    };
    two_pods_per_node(&mut c);
    c.add_node(3).unwrap();
    c.start_agent(2).unwrap();
    c.wait_agent_ready(2).unwrap();
    c.add_pod(2, "n2p0").unwrap();
    wait_until(
        "everyone to reach the new node's pod",
        Duration::from_secs(10),
        || all_reachable(&c),
    );

    let new_block = ip_of(&c, 4, true).to_string();
    let prefix = new_block.rsplit_once('.').unwrap().0.to_string();
    assert!(routes_on(&c, 0).contains(&prefix), "{}", routes_on(&c, 0));
    // The node stops heartbeating: the others drop its routes within the timeout.
    c.signal_agent(2, "KILL").unwrap();
    wait_until("node 3's routes to go", Duration::from_secs(15), || {
        let (r0, r1) = (routes_on(&c, 0), routes_on(&c, 1));
        !r0.contains(&format!("via {}", vtep_of(&c, 2)))
            && !r1.contains(&format!("via {}", vtep_of(&c, 2)))
    });
    let fdb = must(
        "bridge",
        &["-n", &c.nodes[0].netns, "fdb", "show", "dev", "vxlan.calyx"],
    );
    assert!(!fdb.contains("192.0.2.13"), "{fdb}");
}

fn vtep_of(c: &Cluster, node: usize) -> String {
    let out = must(
        "ip",
        &[
            "-n",
            &c.nodes[node].netns,
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            "vxlan.calyx",
        ],
    );
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// What to delete, how, and how to see it is back.
type Deletion<'a> = (&'static str, Box<dyn Fn() + 'a>, Box<dyn Fn() -> bool + 'a>);

fn whatever_is_deleted_comes_back_and_traffic_resumes(etcd: bool) {
    let Some(mut c) = cluster(2, &[POOL_V4], etcd) else {
        return;
    };
    two_pods_per_node(&mut c);
    wait_until("reachability", Duration::from_secs(10), || {
        all_reachable(&c)
    });
    let ns = c.nodes[0].netns.clone();
    let remote_vtep = vtep_of(&c, 1);
    let route_line = routes_on(&c, 0).lines().next().unwrap().to_string();
    let block = route_line.split_whitespace().next().unwrap().to_string();
    let fdb = must("bridge", &["-n", &ns, "fdb", "show", "dev", "vxlan.calyx"]);
    let mac = fdb
        .lines()
        .find(|l| l.contains("192.0.2.12"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let iptables = |args: &[&str]| {
        sh(
            "nsenter",
            &[
                &[&format!("--net=/run/netns/{ns}"), "iptables", "-w"][..],
                args,
            ]
            .concat(),
        )
    };

    let deletions: Vec<Deletion> = vec![
        (
            "route",
            Box::new(|| {
                must("ip", &["-n", &ns, "route", "del", &block]);
            }),
            Box::new(|| routes_on(&c, 0).contains(&block)),
        ),
        (
            "fdb entry",
            Box::new(|| {
                must(
                    "bridge",
                    &[
                        "-n",
                        &ns,
                        "fdb",
                        "del",
                        &mac,
                        "dev",
                        "vxlan.calyx",
                        "dst",
                        "192.0.2.12",
                        "self",
                    ],
                );
            }),
            Box::new(|| {
                must("bridge", &["-n", &ns, "fdb", "show", "dev", "vxlan.calyx"]).contains(&mac)
            }),
        ),
        (
            "neighbour",
            Box::new(|| {
                must(
                    "ip",
                    &[
                        "-n",
                        &ns,
                        "neigh",
                        "del",
                        &remote_vtep,
                        "dev",
                        "vxlan.calyx",
                    ],
                );
            }),
            Box::new(|| {
                must("ip", &["-n", &ns, "neigh", "show", "dev", "vxlan.calyx"])
                    .contains(&format!("{remote_vtep} lladdr"))
            }),
        ),
        (
            "vxlan device",
            Box::new(|| {
                must("ip", &["-n", &ns, "link", "del", "vxlan.calyx"]);
            }),
            Box::new(|| {
                sh("ip", &["-n", &ns, "link", "show", "vxlan.calyx"])
                    .status
                    .success()
                    && routes_on(&c, 0).contains(&block)
            }),
        ),
        (
            "CALYX rules and jumps",
            Box::new(|| {
                iptables(&["-F", "CALYX-FORWARD"]);
                iptables(&["-D", "FORWARD", "-j", "CALYX-FORWARD"]);
                iptables(&["-t", "nat", "-D", "POSTROUTING", "-j", "CALYX-POSTROUTING"]);
            }),
            Box::new(|| {
                iptables(&["-C", "FORWARD", "-j", "CALYX-FORWARD"])
                    .status
                    .success()
                    && iptables(&["-t", "nat", "-C", "POSTROUTING", "-j", "CALYX-POSTROUTING"])
                        .status
                        .success()
                    && String::from_utf8_lossy(&iptables(&["-S", "CALYX-FORWARD"]).stdout)
                        .contains("-j ACCEPT")
            }),
        ),
    ];
    for (what, delete, present) in deletions {
        delete();
        wait_until(
            &format!("the {what} to come back"),
            Duration::from_secs(5),
            &*present,
        );
        wait_until(
            &format!("traffic after the {what} came back"),
            Duration::from_secs(5),
            || all_reachable(&c),
        );
    }
}

fn killing_and_restarting_agents_does_not_interrupt_a_tcp_stream(etcd: bool) {
    use std::io::{Read, Write};
    let Some(mut c) = cluster(2, &[POOL_V4], etcd) else {
        return;
    };
    two_pods_per_node(&mut c);
    wait_until("reachability", Duration::from_secs(10), || {
        all_reachable(&c)
    });
    let server = SocketAddr::new(ip_of(&c, 2, true), 5300);
    let listener = listen_in(&c.pods[2].netns, server).unwrap();
    let mut client = connect_from(&c.pods[0].netns, server).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut total = 0usize;
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                // A signal to this process (SIGCHLD of a killed agent) is no break.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("stream broke after {total} bytes: {e}")),
            }
        }
    });
    let started = Instant::now();
    let mut sent = 0usize;
    let mut restarted = false;
    let logs = |c: &Cluster| {
        (0..2)
            .map(|n| format!("agent {n}:\n{}", c.agent_log_tail(n, 15)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    while started.elapsed() < Duration::from_secs(6) {
        if let Err(e) = client.write_all(&[7u8; 1024]) {
            let at = started.elapsed();
            let reader = reader.join().unwrap();
            panic!(
                "write after {at:?} failed: {e}; reader: {reader:?}\n{}",
                logs(&c)
            );
        }
        sent += 1024;
        if !restarted && started.elapsed() > Duration::from_secs(1) {
            for n in 0..2 {
                c.signal_agent(n, "KILL").unwrap();
            }
            std::thread::sleep(Duration::from_millis(500));
            for n in 0..2 {
                c.start_agent(n).unwrap();
            }
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(client);
    let received = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&c)));
    assert_eq!(received, sent);
    wait_until(
        "reachability after restart",
        Duration::from_secs(10),
        || all_reachable(&c),
    );
}

fn pods_reach_the_world_masqueraded_and_each_other_unmasqueraded(etcd: bool) {
    let Some(mut c) = cluster(2, &[POOL_V4], etcd) else {
        return;
    };
    two_pods_per_node(&mut c);
    let world = c.add_world().unwrap();
    wait_until("reachability", Duration::from_secs(10), || {
        all_reachable(&c)
    });
    // The world has no route to the pools: only masquerade lets the reply come back.
    let server: SocketAddr = "192.0.2.100:5400".parse().unwrap();
    let (peer, got) = transfer(&c.pods[0].netns, &world, server, 64 << 10).unwrap();
    assert_eq!(got, 64 << 10);
    assert_eq!(
        peer.ip().to_string(),
        c.nodes[0].underlay_ip,
        "world sees the node's address"
    );
    let server = SocketAddr::new(ip_of(&c, 2, true), 5401);
    let (peer, _) = transfer(&c.pods[0].netns, &c.pods[2].netns, server, 1024).unwrap();
    assert_eq!(
        peer.ip(),
        ip_of(&c, 0, true),
        "pod-to-pod keeps the pod's source"
    );
}

/// Runs ipamctl on the cluster's store from inside node 1 (an etcd cluster's store is
/// reachable only on the underlay).
fn ipamctl_on(c: &Cluster, args: &[&str]) -> String {
    let ipamctl = PathBuf::from(env!("CARGO_BIN_EXE_calyx-agent")).with_file_name("ipamctl");
    let netns = format!("--net=/run/netns/{}", c.nodes[0].netns);
    let url = c.store_url();
    let mut argv = vec![
        netns.as_str(),
        ipamctl.to_str().unwrap(),
        "--datastore",
        &url,
    ];
    argv.extend(args);
    must("nsenter", &argv)
}

/// A /28 pool of /30 blocks and one block per node: the fourth pod on node 2 must
/// borrow an address from another node's block, and every pod reaches it through the
/// /32 routes the agents program for it (on the lender, over its own blackhole).
fn a_borrowed_address_is_reached_from_every_node(etcd: bool) {
    let Some(mut c) = cluster_with(3, &["10.9.0.0/28"], Some(30), etcd) else {
        return;
    };
    ipamctl_on(&c, &["config", "set", "--max-blocks-per-node", "1"]);
    c.add_pod(0, "lender-a").unwrap();
    c.add_pod(2, "lender-c").unwrap();
    // Node 2's block holds its tunnel address and three pods; the fourth borrows.
    for p in 0..4 {
        c.add_pod(1, &format!("b{p}")).unwrap();
    }
    let borrowed = ip_of(&c, 5, true);
    let shown: serde_json::Value = serde_json::from_str(&ipamctl_on(
        &c,
        &["-o", "json", "show", "--ip", &borrowed.to_string()],
    ))
    .unwrap();
    assert_eq!(shown["borrowed"], true, "{shown}");
    assert_eq!(shown["allocation"]["node"], "node2", "{shown}");
    wait_until(
        "all pods, the borrower included, to reach each other",
        Duration::from_secs(10),
        || all_reachable(&c),
    );
    for node in [0, 2] {
        let routes = routes_on(&c, node);
        assert!(
            routes.contains(&format!("{borrowed} ")) || routes.contains(&format!("{borrowed}/32")),
            "node {node} has no /32 for {borrowed}: {routes}"
        );
    }
    // TCP too, across the lender.
    let server = SocketAddr::new(borrowed, 5005);
    let (peer, got) = transfer(&c.pods[0].netns, &c.pods[5].netns, server, 1 << 20).unwrap();
    assert_eq!((peer.ip(), got), (ip_of(&c, 0, true), 1 << 20));
}

/// Every scenario runs on the embedded store and on a real etcd.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[test]
            fn file() {
                super::$name(false)
            }
            #[test]
            fn etcd() {
                super::$name(true)
            }
        })*
    };
}

on_both_stores!(
    pods_reach_each_other_across_nodes_over_ipv4_and_ipv6,
    ten_megabytes_cross_node_with_the_right_mtu,
    pods_work_when_every_node_drops_forwarded_traffic_by_default,
    a_joining_node_is_reached_and_a_departed_node_is_dropped,
    whatever_is_deleted_comes_back_and_traffic_resumes,
    killing_and_restarting_agents_does_not_interrupt_a_tcp_stream,
    pods_reach_the_world_masqueraded_and_each_other_unmasqueraded,
    a_borrowed_address_is_reached_from_every_node,
);

/// GET `path` from the agent's metrics address inside a node's namespace.
fn http_get(c: &Cluster, node: usize, path: &str) -> String {
    http_get_in(&c.nodes[node].netns, path)
        .unwrap_or_else(|| panic!("GET {path} on node {node}: no answer"))
}

/// GET `path` from 127.0.0.1:9099 inside `netns`; None when nothing answers.
fn http_get_in(netns: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr: SocketAddr = "127.0.0.1:9099".parse().unwrap();
    let mut stream = connect_from(netns, addr).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[test]
fn agents_serve_metrics_health_and_readiness() {
    let Some(c) = cluster(2, &[POOL_V4], false) else {
        return;
    };
    wait_until("readiness", Duration::from_secs(10), || {
        is_ok(&http_get(&c, 0, "/readyz"))
    });
    assert!(is_ok(&http_get(&c, 0, "/healthz")));
    // Node2 may be known before its block is: the route to it comes a run later.
    let wanted = [
        "calyx_agent_nodes_known 2",
        "calyx_agent_nodes_live 2",
        "calyx_agent_routes_programmed 1",
        "calyx_agent_reconciles_total",
        "calyx_agent_reconcile_duration_seconds_bucket",
        "calyx_agent_reconcile_errors_total 0",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = http_get(&c, 0, "/metrics");
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|name| !metrics.contains(name))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics still lacks {missing:?} after 10 s:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is_ok(response: &str) -> bool {
    response
        .lines()
        .next()
        .is_some_and(|status| status.contains(" 200 "))
}

/// Flags that would make every reconcile fail (or break the node) are refused at
/// start with a message naming the flag.
#[test]
fn bad_flags_are_refused_at_start_naming_the_flag() {
    let (_, agent) = binaries();
    for (flag, value) in [
        ("--mtu", "0"),
        ("--mtu", "70000"),
        ("--vxlan-vni", "99999999"),
        ("--vxlan-port", "0"),
        ("--vxlan-device", "a-name-much-too-long"),
        ("--resync-seconds", "0"),
    ] {
        let out = std::process::Command::new(&agent)
            .args(["--node-name", "n1", flag, value])
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}

/// `--vxlan-device` naming a link that is not a VXLAN device (here the underlay
/// itself) leaves that link alone.
#[test]
fn a_vxlan_device_name_that_is_another_link_is_never_deleted() {
    if !privileged() {
        return;
    }
    let mut lone = LoneAgent::start(
        "dev",
        &["--vxlan-device", "under0", "--metrics-addr", "127.0.0.1:0"],
        None,
    );
    std::thread::sleep(Duration::from_secs(3));
    let log = lone.stop();
    let links = must("ip", &["-n", &lone.ns.0, "-o", "link", "show", "under0"]);
    assert!(
        links.contains("under0"),
        "the underlay was deleted; agent log:\n{log}"
    );
    assert!(log.contains("not a VXLAN device"), "{log}");
}

/// One agent in a namespace of its own with an underlay veth `under0`, on a file
/// store unless `datastore` names another.
struct LoneAgent {
    ns: NamespaceGuard,
    child: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl LoneAgent {
    fn start(name: &str, extra: &[&str], datastore: Option<&str>) -> LoneAgent {
        let (_, agent) = binaries();
        let ns = NamespaceGuard(format!("cyxo{}{name}", std::process::id()));
        let n = ns.0.as_str();
        must("ip", &["netns", "add", n]);
        must("ip", &["-n", n, "link", "set", "lo", "up"]);
        must(
            "ip",
            &[
                "-n", n, "link", "add", "under0", "type", "veth", "peer", "name", "under1",
            ],
        );
        must(
            "ip",
            &["-n", n, "addr", "add", "192.0.2.10/24", "dev", "under0"],
        );
        must("ip", &["-n", n, "link", "set", "under0", "up"]);
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}/store", dir.path().display());
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{n}"))
            .arg(&agent)
            .args([
                "--node-name",
                "n1",
                "--datastore",
                datastore.unwrap_or(&store),
            ])
            .args(["--underlay-interface", "under0", "--pool", "10.244.0.0/16"])
            .args(["--no-firewall", "--state-dir"])
            .arg(dir.path().join("state"))
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        LoneAgent {
            ns,
            child: Some(child),
            _dir: dir,
        }
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Kills the agent; returns what it logged.
    fn stop(&mut self) -> String {
        let mut child = self.child.take().expect("started");
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

impl Drop for LoneAgent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Deletes a namespace when dropped.
struct NamespaceGuard(String);

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.0]);
    }
}

/// Waits until node 0's agent is ready and routes to the other node; returns its routes.
fn ready_with_a_route(c: &Cluster) -> String {
    wait_until("readiness", Duration::from_secs(15), || {
        is_ok(&http_get(c, 0, "/readyz"))
    });
    wait_until("a route to the other node", Duration::from_secs(10), || {
        !routes_on(c, 0).is_empty()
    });
    routes_on(c, 0)
}

/// Store files moved away under running agents: the agents say so, go unready, keep
/// every route, and come back when the files do; a node record deleted from the store
/// is registered again.
#[test]
fn a_vanished_store_makes_agents_unready_and_keeps_their_routes() {
    let Some(c) = cluster(2, &[POOL_V4], false) else {
        return;
    };
    let routes = ready_with_a_route(&c);
    let dir = c.state_dir();
    let aside = dir.join("moved-aside");
    std::fs::create_dir_all(&aside).unwrap();
    let files = ["store", "store.journal"];
    for f in files {
        if dir.join(f).exists() {
            std::fs::rename(dir.join(f), aside.join(f)).unwrap();
        }
    }
    wait_until(
        "unready while the store is gone",
        Duration::from_secs(10),
        || {
            let ready = http_get(&c, 0, "/readyz");
            !is_ok(&ready) && ready.contains("vanished")
        },
    );
    std::thread::sleep(Duration::from_secs(3)); // several resyncs
    assert_eq!(
        routes_on(&c, 0),
        routes,
        "routes changed while the store was gone"
    );
    for f in files {
        if aside.join(f).exists() {
            std::fs::rename(aside.join(f), dir.join(f)).unwrap();
        }
    }
    wait_until(
        "ready again once the store is back",
        Duration::from_secs(15),
        || is_ok(&http_get(&c, 0, "/readyz")),
    );

    let store = c.store_url();
    let ipamctl = binaries().0.with_file_name("ipamctl");
    let record = |node: &str| {
        let out = std::process::Command::new(&ipamctl)
            .args(["--datastore", &store, "-o", "json", "node", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(node)
    };
    let name = c.nodes[1].name.clone();
    assert!(record(&name));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = calyx_ipam::store::open(&store).unwrap();
        let key = calyx_ipam::model::node_key(&name);
        let current = s.get(&key).await.unwrap().unwrap();
        s.commit(vec![calyx_ipam::store::Write::Delete {
            key,
            expect: calyx_ipam::store::Expect::Revision(current.revision),
        }])
        .await
        .unwrap();
    });
    wait_until("the node registered again", Duration::from_secs(10), || {
        record(&name)
    });
}

/// Against an unreachable datastore the agent serves /healthz and /readyz from the
/// start, says what it waits for, and keeps trying, with `--pool` as without.
#[test]
fn an_agent_waiting_for_its_datastore_answers_health_and_keeps_trying() {
    if !privileged() {
        return;
    }
    let mut lone = LoneAgent::start(
        "wait",
        &["--metrics-addr", "127.0.0.1:9099"],
        Some("etcd://127.0.0.1:1"),
    );
    let ns = lone.ns.0.clone();
    let mut ready = None;
    for _ in 0..50 {
        ready = http_get_in(&ns, "/readyz");
        if ready.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let still_running = lone.running();
    let ready_later = http_get_in(&ns, "/readyz");
    let live = http_get_in(&ns, "/livez");
    let log = lone.stop();
    let ready = ready.expect("/readyz answered within 5 s of the start");
    assert!(!is_ok(&ready), "{ready}");
    assert!(still_running, "the agent exited instead of waiting: {log}");
    let ready_later = ready_later.expect("/readyz still answers");
    assert!(
        ready_later.contains("waiting for the datastore"),
        "{ready_later}"
    );
    let live = live.expect("/livez answers");
    assert!(is_ok(&live), "waiting for the datastore is alive: {live}");
}

/// A frozen etcd (it accepts connections and answers nothing) makes the agents
/// unready within a few heartbeats, keeps every route, and they are ready again once
/// it answers.
#[test]
fn a_frozen_etcd_makes_agents_unready_and_keeps_their_routes() {
    let Some(c) = cluster(2, &[POOL_V4], true) else {
        return;
    };
    let routes = ready_with_a_route(&c);
    let etcd = c.etcd.as_ref().expect("an etcd cluster");
    etcd.freeze(true);
    let unready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The heartbeat's own deadline or the etcd client's request timeout, whichever
        // comes first, names the problem.
        wait_until(
            "unready while etcd is frozen",
            Duration::from_secs(30),
            || {
                let ready = http_get(&c, 0, "/readyz");
                !is_ok(&ready) && ready.contains("heartbeat")
            },
        );
        assert_eq!(
            routes_on(&c, 0),
            routes,
            "routes changed while etcd was frozen"
        );
        // The DaemonSet's liveness probe: an etcd outage must not restart every agent.
        let live = http_get(&c, 0, "/livez");
        assert!(is_ok(&live), "/livez failed during the outage: {live}");
    }));
    etcd.freeze(false);
    if let Err(panic) = unready {
        std::panic::resume_unwind(panic);
    }
    wait_until(
        "ready again once etcd answers",
        Duration::from_secs(30),
        || is_ok(&http_get(&c, 0, "/readyz")),
    );
}

/// An agent meeting a datastore written by a newer Calyx refuses to start, says why,
/// and writes nothing to it.
#[test]
fn an_agent_refuses_a_datastore_with_a_newer_schema() {
    use calyx_ipam::store::{Expect, Write};
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", dir.path().display());
    let store = calyx_ipam::store::open(&url).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let write = |key: &str, value: &str| Write::Put {
        key: key.into(),
        value: value.into(),
        expect: Expect::Absent,
    };
    rt.block_on(store.commit(vec![write(
        calyx_ipam::schema::SCHEMA_KEY,
        r#"{"version":99}"#,
    )]))
    .unwrap();
    let mut lone = LoneAgent::start("schema", &[], Some(&url));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while lone.running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let exited = !lone.running();
    let log = lone.stop();
    assert!(exited, "the agent kept running: {log}");
    assert!(log.contains("schema version 99"), "{log}");
    let keys = rt.block_on(store.list("nodes/")).unwrap();
    assert!(
        keys.is_empty(),
        "the agent registered on a store it refused"
    );
}
