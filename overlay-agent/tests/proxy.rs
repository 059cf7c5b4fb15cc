//! The service proxy end to end: real node namespaces on an underlay bridge, real
//! agents in --proxy-mode nftables and iptables reading a --services-dir, backends in
//! pods wired by the real plugin, a world host on the underlay, real packets. Every
//! path of issue 10's list (1-14) is checked, with FORWARD policy DROP on every node.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use calyx_e2e::cluster::{Cluster, ClusterSpec, POOL_V4, POOL_V6};
use calyx_e2e::lab::{must, privileged, sh};
use calyx_e2e::services::{
    ask_tcp, ask_tcp_within, ask_udp, echo, read_greeting, service_object, slice_objects,
    tcp_backend, udp_backend, write_objects, Answer, Ep, BACKEND_PORT,
};
use calyx_e2e::sockets::connect_from;
use serde_json::{json, Value};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One cluster at a time: several checks are about time ("refused at once", "no
/// stall"), and five clusters on two cores make a slow machine, not a wrong proxy.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct TestCluster {
    cluster: Cluster,
    services: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = Cluster::destroy(&self.cluster.prefix);
    }
}

impl std::ops::Deref for TestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

fn binaries() -> (PathBuf, PathBuf) {
    calyx_e2e::cluster::binaries_beside(env!("CARGO_BIN_EXE_calyx-agent"))
}

/// Two nodes with agents in `mode`, FORWARD policy DROP on both, a backend pod on
/// each (b1 on node1, b2 on node2), a client pod on node1, and a world host.
fn cluster(mode: &str, etcd: bool) -> Option<TestCluster> {
    if !privileged() || (etcd && !calyx_e2e::etcd::available()) {
        return None;
    }
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (plugin, agent) = binaries();
    let services = tempfile::tempdir().unwrap();
    let spec = ClusterSpec {
        prefix: format!(
            "cyxp{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ),
        plugin,
        agent: Some(agent),
        pools: vec![POOL_V4.to_string(), POOL_V6.to_string()],
        block_size: None,
        agent_args: vec![
            "--resync-seconds".into(),
            "5".into(),
            "--proxy-sync-seconds".into(),
            "1".into(),
            "--proxy-mode".into(),
            mode.into(),
            "--services-dir".into(),
            services.path().display().to_string(),
        ],
        nodes: 2,
        etcd,
    };
    let cluster = match Cluster::create(&spec) {
        Ok(c) => c,
        Err(e) => {
            let _ = Cluster::destroy(&spec.prefix);
            panic!("cluster: {e:#}");
        }
    };
    let mut c = TestCluster {
        cluster,
        services,
        _turn: turn,
    };
    for node in &c.nodes {
        // A real node has an IPv6 default route; a ClusterIP is routed by it until DNAT.
        must(
            "ip",
            &[
                "-n",
                &node.netns,
                "-6",
                "route",
                "add",
                "default",
                "dev",
                "eth0",
            ],
        );
        for tool in ["iptables", "ip6tables"] {
            must(
                "ip",
                &["netns", "exec", &node.netns, tool, "-P", "FORWARD", "DROP"],
            );
        }
    }
    for (node, name) in [(0, "b1"), (1, "b2"), (0, "c1")] {
        c.add_pod(node, name).unwrap();
    }
    for pod in ["b1", "b2"] {
        let netns = c.pods.iter().find(|p| p.name == pod).unwrap().netns.clone();
        tcp_backend(&netns, pod, BACKEND_PORT).unwrap();
        udp_backend(&netns, pod, BACKEND_PORT).unwrap();
    }
    let world = c.add_world().unwrap();
    let other = c.add_host("other", 101).unwrap();
    for host in [&world, &other] {
        // External and LoadBalancer IPs are routed to node1, as a router would.
        for ip in [EXTERNAL_IP, LB_IP] {
            must("ip", &["-n", host, "route", "add", ip, "via", "192.0.2.11"]);
        }
    }
    Some(c)
}

const EXTERNAL_IP: &str = "198.51.100.200";
const LB_IP: &str = "198.51.100.201";
const NODE1: &str = "192.0.2.11";
const NODE2: &str = "192.0.2.12";

fn pod_ip(c: &Cluster, pod: &str, v4: bool) -> String {
    c.pods
        .iter()
        .find(|p| p.name == pod)
        .unwrap()
        .ips
        .iter()
        .find(|ip| ip.contains('.') == v4)
        .unwrap()
        .clone()
}

fn netns_of(c: &Cluster, name: &str) -> String {
    if let Some(pod) = c.pods.iter().find(|p| p.name == name) {
        return pod.netns.clone();
    }
    format!("{}-{name}", c.prefix)
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Every Service of the scenarios.
fn services(c: &Cluster) -> Vec<Value> {
    let b1 = || Ep::ready(pod_ip(c, "b1", true), "node1");
    let b2 = || Ep::ready(pod_ip(c, "b2", true), "node2");
    let b1v6 = Ep::ready(pod_ip(c, "b1", false), "node1");
    let b2v6 = Ep::ready(pod_ip(c, "b2", false), "node2");
    let http = [("http", "TCP")];
    let mut out = Vec::new();
    let mut add = |svc: Value, ports: &[(&str, &str)], eps: &[Ep]| {
        let name = svc["metadata"]["name"].as_str().unwrap().to_string();
        out.push(svc);
        out.extend(slice_objects(&name, ports, eps));
    };
    add(
        service_object(
            "web",
            &["10.96.0.10", "fd00:96::10"],
            &[
                ("http", "TCP", 80, Some(30080)),
                ("dns", "UDP", 53, Some(30053)),
            ],
        ),
        &[("http", "TCP"), ("dns", "UDP")],
        &[b1(), b2(), b1v6, b2v6],
    );
    add(
        service_object(
            "none",
            &["10.96.0.11", "fd00:96::11"],
            &[("http", "TCP", 80, None)],
        ),
        &http,
        &[],
    );
    let mut local = service_object(
        "local",
        &["10.96.0.12"],
        &[("http", "TCP", 80, Some(30081))],
    );
    local["spec"]["externalTrafficPolicy"] = json!("Local");
    local["spec"]["healthCheckNodePort"] = json!(32001);
    add(local, &http, &[b2()]);
    let mut sticky = service_object("sticky", &["10.96.0.13"], &[("http", "TCP", 80, None)]);
    sticky["spec"]["sessionAffinity"] = json!("ClientIP");
    sticky["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 300}});
    add(sticky, &http, &[b1(), b2()]);
    add(
        service_object("remote", &["10.96.0.14"], &[("http", "TCP", 80, None)]),
        &http,
        &[b2()],
    );
    let mut ext = service_object("ext", &["10.96.0.16"], &[("http", "TCP", 80, Some(30082))]);
    ext["spec"]["type"] = json!("LoadBalancer");
    ext["spec"]["externalIPs"] = json!([EXTERNAL_IP]);
    ext["spec"]["loadBalancerSourceRanges"] = json!(["192.0.2.100/32"]);
    ext["status"]["loadBalancer"] = json!({"ingress": [{"ip": LB_IP}]});
    add(ext, &http, &[b1(), b2()]);
    out
}

/// A time limit, three times as long inside the VM (software emulation, several times
/// slower: each periodic check spawns iptables a dozen times): the checks are about what
/// happens, not how fast.
fn patience(limit: Duration) -> Duration {
    if std::env::var_os("CALYX_IN_VM").is_some() {
        limit * 3
    } else {
        limit
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let timeout = patience(timeout);
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Asks `n` times; the backends seen and the sources they saw.
fn ask_many(
    netns: &str,
    to: SocketAddr,
    n: usize,
) -> Result<(BTreeSet<String>, BTreeSet<IpAddr>), String> {
    let mut backends = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let a = ask_tcp_within(netns, to, Duration::from_secs(3))
            .map_err(|e| format!("{netns} -> {to}: {e:#}"))?;
        backends.insert(a.backend);
        seen.insert(a.seen);
    }
    Ok((backends, seen))
}

/// A connection through a Service that landed on `backend` (40 tries).
fn connection_to(
    netns: &str,
    service: SocketAddr,
    backend: &str,
) -> Result<std::net::TcpStream, String> {
    for _ in 0..40 {
        let stream = connect_from(netns, service).map_err(|e| format!("{e:#}"))?;
        if read_greeting(&stream)
            .map_err(|e| format!("{e:#}"))?
            .backend
            == backend
        {
            return Ok(stream);
        }
        // Reset, not closed: no TIME_WAIT left behind in IPVS's counts.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    Err(format!("never reached {backend} through {service}"))
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs the checks, reporting every failure (with its item number) at the end.
struct Checks(Vec<String>);

impl Checks {
    fn run(&mut self, item: &str, check: impl FnOnce() -> Result<(), String>) {
        let started = Instant::now();
        match check() {
            Ok(()) => eprintln!("ok   {item} ({:.1} s)", started.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("FAIL {item}: {e}");
                self.0.push(format!("{item}: {e}"));
            }
        }
    }

    fn finish(self, c: &Cluster) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n{}\nnode1 agent log:\n{}{}",
            self.0.len(),
            self.0.join("\n"),
            c.agent_log_tail(0, 30),
            ipvs_state(&c.nodes[0].netns)
        );
    }
}

/// In IPVS mode, what node1's kernel holds (for a failure's report).
fn ipvs_state(netns: &str) -> String {
    if !std::path::Path::new("/proc/net/ip_vs").exists() {
        return String::new();
    }
    let run = |cmd: &str| {
        let out = sh("ip", &["netns", "exec", netns, "sh", "-c", cmd]);
        format!(
            "\n$ {cmd}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    [
        "ipvsadm -Ln --stats",
        "ip addr show kube-ipvs0",
        "ipset save",
        "ip6tables-save -c",
        "conntrack -L -f ipv6",
        "ip -6 route",
        "nstat -az | grep -i -E 'ip6|icmp6' | grep -v ' 0 '",
    ]
    .iter()
    .map(|c| run(c))
    .collect()
}

fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

fn http_status(netns: &str, to: SocketAddr, path: &str) -> Option<(u16, String)> {
    calyx_e2e::sockets::http_get(netns, to, path)
}

/// Writes the scenario's Services and waits until node `node` serves them.
fn publish(c: &TestCluster, objects: Vec<Value>) {
    write_objects(c.services.path(), "lab.json", objects).unwrap();
}

fn wait_for_web(c: &TestCluster) {
    let c1 = netns_of(c, "c1");
    // Both families: a mode writes one after the other, and IPv6 may lag IPv4.
    wait_until("the web Service", Duration::from_secs(20), || {
        ask_tcp_within(&c1, addr("10.96.0.10", 80), Duration::from_millis(500)).is_ok()
            && ask_tcp_within(&c1, addr("fd00:96::10", 80), Duration::from_millis(500)).is_ok()
    })
    .unwrap_or_else(|e| panic!("{e}\nnode1 agent log:\n{}", c.agent_log_tail(0, 40)));
}

fn every_path(mode: &str, etcd: bool) {
    let Some(c) = cluster(mode, etcd) else {
        return;
    };
    publish(&c, services(&c));
    wait_for_web(&c);
    let (c1, b1, world, other) = (
        netns_of(&c, "c1"),
        netns_of(&c, "b1"),
        netns_of(&c, "world"),
        netns_of(&c, "other"),
    );
    let node1 = c.nodes[0].netns.clone();
    let c1_ip = ip(&pod_ip(&c, "c1", true));
    let mut checks = Checks(Vec::new());

    checks.run(
        "1+2 pod -> ClusterIP spreads, source kept, same and other node",
        || {
            let (backends, seen) = ask_many(&c1, addr("10.96.0.10", 80), 30)?;
            expect(backends == set(&["b1", "b2"]), || {
                format!("backends {backends:?}")
            })?;
            expect(seen == BTreeSet::from([c1_ip]), || {
                format!("sources seen {seen:?}")
            })
        },
    );
    checks.run("1 IPv6 ClusterIP", || {
        let (backends, seen) = ask_many(&c1, addr("fd00:96::10", 80), 30)?;
        expect(backends == set(&["b1", "b2"]), || {
            format!("backends {backends:?}")
        })?;
        let own = ip(&pod_ip(&c, "c1", false));
        expect(seen == BTreeSet::from([own]), || {
            format!("sources seen {seen:?}")
        })
    });
    checks.run("1 UDP port of the same Service (named target port)", || {
        let mut backends = BTreeSet::new();
        for _ in 0..20 {
            let a = ask_udp(&c1, 0, addr("10.96.0.10", 53), Duration::from_secs(2))
                .map_err(|e| format!("{e:#}"))?;
            backends.insert(a.backend);
        }
        expect(backends == set(&["b1", "b2"]), || {
            format!("backends {backends:?}")
        })
    });
    checks.run("IPv6: the node itself, hairpin, UDP, no endpoints", || {
        let (backends, seen) = ask_many(&node1, addr("fd00:96::10", 80), 20)?;
        expect(backends == set(&["b1", "b2"]), || {
            format!("node: backends {backends:?}")
        })?;
        let c1_v6 = ip(&pod_ip(&c, "c1", false));
        expect(!seen.contains(&c1_v6), || format!("node: sources {seen:?}"))?;
        let b1_v6 = ip(&pod_ip(&c, "b1", false));
        let mut hairpin = None;
        for _ in 0..40 {
            let a = ask_tcp_within(&b1, addr("fd00:96::10", 80), Duration::from_secs(3))
                .map_err(|e| format!("hairpin: {e:#}"))?;
            if a.backend == "b1" {
                hairpin = Some(a);
                break;
            }
        }
        let a = hairpin.ok_or("hairpin: never landed on itself")?;
        expect(a.seen != b1_v6, || {
            format!("hairpin not masqueraded: {a:?}")
        })?;
        let mut backends = BTreeSet::new();
        for _ in 0..20 {
            let a = ask_udp(&c1, 0, addr("fd00:96::10", 53), Duration::from_secs(2))
                .map_err(|e| format!("UDP: {e:#}"))?;
            backends.insert(a.backend);
        }
        expect(backends == set(&["b1", "b2"]), || {
            format!("UDP: backends {backends:?}")
        })?;
        let deadline = Instant::now() + Duration::from_secs(7);
        loop {
            let started = Instant::now();
            let r = ask_tcp_within(&c1, addr("fd00:96::11", 80), Duration::from_secs(1));
            let refused = r
                .as_ref()
                .is_err_and(|e| format!("{e:#}").contains("refused"));
            if refused && started.elapsed() < Duration::from_secs(1) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let rules = sh(
                    "ip",
                    &["netns", "exec", &node1, "ip6tables-save", "-t", "filter"],
                );
                return Err(format!(
                    "no endpoints: {r:?}\n{}",
                    String::from_utf8_lossy(&rules.stdout)
                ));
            }
        }
    });
    checks.run("3 the node itself -> ClusterIP (masqueraded)", || {
        let (backends, seen) = ask_many(&node1, addr("10.96.0.10", 80), 20)?;
        expect(backends == set(&["b1", "b2"]), || {
            format!("backends {backends:?}")
        })?;
        expect(!seen.contains(&c1_ip), || format!("sources seen {seen:?}"))
    });
    checks.run(
        "4 hairpin: a pod reaching itself through its Service",
        || {
            let b1_ip = ip(&pod_ip(&c, "b1", true));
            for _ in 0..40 {
                let a = ask_tcp_within(&b1, addr("10.96.0.10", 80), Duration::from_secs(3))
                    .map_err(|e| format!("{e:#}"))?;
                if a.backend == "b1" {
                    return expect(a.seen != b1_ip, || {
                        format!("hairpin not masqueraded: {a:?}")
                    });
                }
            }
            Err("never landed on itself in 40 tries".into())
        },
    );
    checks.run(
        "5 NodePort from the world on both nodes, masqueraded",
        || {
            for node in [NODE1, NODE2] {
                let (backends, seen) = ask_many(&world, addr(node, 30080), 20)?;
                expect(backends == set(&["b1", "b2"]), || {
                    format!("{node}: backends {backends:?}")
                })?;
                expect(!seen.contains(&ip("192.0.2.100")), || {
                    format!("{node}: sources {seen:?}")
                })?;
            }
            Ok(())
        },
    );
    checks.run("5 NodePort is not opened on 127.0.0.1", || {
        let r = ask_tcp_within(&node1, addr("127.0.0.1", 30080), Duration::from_secs(1));
        expect(r.is_err(), || format!("answered on loopback: {r:?}"))
    });
    checks.run(
        "6 eTP Local: source kept on the endpoint's node, dropped elsewhere",
        || {
            let (backends, seen) = ask_many(&world, addr(NODE2, 30081), 5)?;
            expect(backends == set(&["b2"]), || {
                format!("backends {backends:?}")
            })?;
            expect(seen == BTreeSet::from([ip("192.0.2.100")]), || {
                format!("sources {seen:?}")
            })?;
            let r = ask_tcp_within(&world, addr(NODE1, 30081), Duration::from_secs(1));
            expect(r.is_err(), || format!("node1 answered: {r:?}"))
        },
    );
    checks.run(
        "6 healthCheckNodePort: 200 with the local count, else 503",
        || {
            let n2 = http_status(&world, addr(NODE2, 32001), "/healthz");
            expect(
                n2.as_ref()
                    .is_some_and(|(s, body)| *s == 200 && body.contains("\"localEndpoints\":1")),
                || format!("node2: {n2:?}"),
            )?;
            let n1 = http_status(&world, addr(NODE1, 32001), "/healthz");
            expect(n1.as_ref().is_some_and(|(s, _)| *s == 503), || {
                format!("node1: {n1:?}")
            })
        },
    );
    checks.run(
        "7 externalIP, LoadBalancer IP and loadBalancerSourceRanges",
        || {
            let (backends, _) = ask_many(&world, addr(EXTERNAL_IP, 80), 20)?;
            expect(backends == set(&["b1", "b2"]), || {
                format!("external IP: {backends:?}")
            })?;
            let (backends, _) = ask_many(&world, addr(LB_IP, 80), 20)?;
            expect(backends == set(&["b1", "b2"]), || {
                format!("LB IP: {backends:?}")
            })?;
            let r = ask_tcp_within(&other, addr(LB_IP, 80), Duration::from_secs(1));
            expect(r.is_err(), || {
                format!("a source outside the ranges got in: {r:?}")
            })?;
            // The external IP has no source ranges: "other" gets in there.
            ask_tcp_within(&other, addr(EXTERNAL_IP, 80), Duration::from_secs(3))
                .map(|_| ())
                .map_err(|e| format!("other -> external IP: {e:#}"))
        },
    );
    checks.run("8 sessionAffinity ClientIP sticks to one endpoint", || {
        let (backends, _) = ask_many(&c1, addr("10.96.0.13", 80), 15)?;
        expect(backends.len() == 1, || format!("backends {backends:?}"))
    });
    checks.run("10 no endpoints: refused at once", || {
        // In iptables mode the overlay's pool ACCEPT in FORWARD may have been inserted
        // above the proxy's REJECT after the proxy's first sync; the proxy's next full
        // sync (5 s here) puts its jumps first again. From then on: refused at once.
        let deadline = Instant::now() + Duration::from_secs(7);
        loop {
            let started = Instant::now();
            let r = ask_tcp_within(&c1, addr("10.96.0.11", 80), Duration::from_secs(1));
            let took = started.elapsed();
            let refused = r
                .as_ref()
                .is_err_and(|e| format!("{e:#}").contains("refused"));
            if refused && took < Duration::from_secs(1) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{r:?} after {took:?}"));
            }
        }
    });
    checks.run(
        "13 no 63-second stall: marked flow to a remote endpoint, software checksums, txrehash=0",
        || {
            must(
                "ip",
                &[
                    "netns", "exec", &node1, "ethtool", "-K", "eth0", "tx", "off",
                ],
            );
            let _ = sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &node1,
                    "sysctl",
                    "-qw",
                    "net.core.txrehash=0",
                ],
            );
            let mut worst = Duration::ZERO;
            for _ in 0..10 {
                let started = Instant::now();
                let a = ask_tcp_within(&node1, addr("10.96.0.14", 80), Duration::from_secs(5))
                    .map_err(|e| format!("{e:#}"))?;
                worst = worst.max(started.elapsed());
                expect(a.backend == "b2", || format!("{a:?}"))?;
            }
            expect(worst < Duration::from_secs(1), || {
                format!("slowest connect took {worst:?}")
            })
        },
    );
    checks.run("metrics and readiness", || {
        let r = http_status(&node1, addr("127.0.0.1", 9099), "/readyz");
        expect(r.as_ref().is_some_and(|(s, _)| *s == 200), || {
            format!("/readyz: {r:?}")
        })?;
        let (_, metrics) =
            http_status(&node1, addr("127.0.0.1", 9099), "/metrics").ok_or("no /metrics")?;
        for name in [
            "calyx_agent_proxy_services_programmed",
            "calyx_agent_proxy_endpoints_programmed",
            "calyx_agent_proxy_full_sync_duration_seconds_bucket",
            "calyx_agent_proxy_partial_sync_duration_seconds_bucket",
            "calyx_agent_proxy_sync_errors_total 0",
            "calyx_agent_proxy_last_successful_sync_timestamp_seconds",
            "calyx_agent_proxy_network_programming_duration_seconds_bucket",
        ] {
            expect(metrics.contains(name), || format!("/metrics lacks {name}"))?;
        }
        Ok(())
    });
    changes_take_effect(&c, &mut checks);
    if mode == "ipvs" {
        ipvs_drain_and_restart(&c, &mut checks);
    }
    checks.finish(&c);
}

/// IPVS mode: a real server whose endpoint goes is drained (weight 0, its connection
/// lives on, no new ones) and removed once that connection ends; an agent restart
/// keeps an established connection and rewrites nothing.
fn ipvs_drain_and_restart(c: &TestCluster, checks: &mut Checks) {
    let c1 = netns_of(c, "c1");
    let node1 = c.nodes[0].netns.clone();
    let b1 = || Ep::ready(pod_ip(c, "b1", true), "node1");
    let b2 = || Ep::ready(pod_ip(c, "b2", true), "node2");
    let b2_server = format!("{}:{BACKEND_PORT}", pod_ip(c, "b2", true));
    // A Service of its own: IPVS counts the earlier checks' closed connections to the
    // other Services' servers for two minutes (TIME_WAIT).
    const VIP: &str = "10.96.0.30";
    let drained = |c: &TestCluster, eps: &[Ep]| {
        let mut all = services(c);
        all.push(service_object(
            "drain",
            &[VIP],
            &[("http", "TCP", 80, None)],
        ));
        all.extend(slice_objects("drain", &[("http", "TCP")], eps));
        publish(c, all);
    };
    // Empty while the virtual service does not exist yet.
    let ipvsadm = || {
        let out = sh(
            "ip",
            &[
                "netns",
                "exec",
                &node1,
                "ipvsadm",
                "-Ln",
                "-t",
                &format!("{VIP}:80"),
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut kept = None;
    checks.run(
        "ipvs: a removed real server drains: weight 0, its connection lives on",
        || {
            drained(c, &[b1(), b2()]);
            wait_until("b2 in web", Duration::from_secs(10), || {
                ipvsadm().contains(&b2_server)
            })?;
            let mut conn = connection_to(&c1, addr(VIP, 80), "b2")?;
            drained(c, &[b1()]);
            wait_until("b2 at weight 0", Duration::from_secs(10), || {
                ipvsadm()
                    .lines()
                    .any(|l| l.contains(&b2_server) && l.split_whitespace().nth(3) == Some("0"))
            })?;
            let (backends, _) = ask_many(&c1, addr(VIP, 80), 10)?;
            expect(backends == set(&["b1"]), || {
                format!("new connections went to {backends:?}")
            })?;
            let reply = echo(&mut conn, "draining").map_err(|e| format!("{e:#}"))?;
            expect(reply == "b2 draining", || {
                format!("established connection: {reply:?}")
            })?;
            kept = Some(conn);
            Ok(())
        },
    );
    checks.run(
        "ipvs: an agent restart keeps an established connection",
        || {
            let conn = kept
                .as_mut()
                .ok_or("no connection from the previous check")?;
            c.signal_agent(0, "KILL").map_err(|e| format!("{e:#}"))?;
            c.start_agent(0).map_err(|e| format!("{e:#}"))?;
            c.wait_agent_ready(0).map_err(|e| format!("{e:#}"))?;
            let reply = echo(conn, "after restart").map_err(|e| format!("{e:#}"))?;
            expect(reply == "b2 after restart", || {
                format!("established connection: {reply:?}")
            })?;
            let (backends, _) = ask_many(&c1, addr(VIP, 80), 10)?;
            expect(backends == set(&["b1"]), || {
                format!("new connections went to {backends:?}")
            })
        },
    );
    checks.run(
        "ipvs: the drained server goes once its connection ends",
        || {
            // Reset, not closed: IPVS counts a closed connection (TIME_WAIT) for two
            // minutes, a reset one for ten seconds.
            if let Some(conn) = kept.take() {
                socket2::SockRef::from(&conn)
                    .set_linger(Some(Duration::ZERO))
                    .map_err(|e| format!("SO_LINGER: {e}"))?;
            }
            wait_until("b2 removed", Duration::from_secs(30), || {
                !ipvsadm().contains(&b2_server)
            })
        },
    );
}

/// Items 9 and 11: endpoints that start terminating or go away.
fn changes_take_effect(c: &TestCluster, checks: &mut Checks) {
    let c1 = netns_of(c, "c1");
    let b1 = || Ep::ready(pod_ip(c, "b1", true), "node1");
    let b2 = || Ep::ready(pod_ip(c, "b2", true), "node2");
    let udp = [("dns", "UDP")];
    let http = [("http", "TCP")];
    let with = |extra: Vec<Value>| {
        let mut all = services(c);
        all.extend(extra);
        all
    };
    let flip = |eps: &[Ep], term: &[Ep]| {
        let mut extra = vec![service_object(
            "flip",
            &["10.96.0.17"],
            &[("dns", "UDP", 53, None)],
        )];
        extra.extend(slice_objects("flip", &udp, eps));
        extra.push(service_object(
            "term",
            &["10.96.0.18"],
            &[("http", "TCP", 80, None)],
        ));
        extra.extend(slice_objects("term", &http, term));
        with(extra)
    };
    publish(c, flip(&[b1()], &[b1(), b2()]));
    let _ = wait_until(
        "the flip and term Services",
        Duration::from_secs(10),
        || {
            ask_udp(&c1, 0, addr("10.96.0.17", 53), Duration::from_millis(300)).is_ok()
                && ask_tcp_within(&c1, addr("10.96.0.18", 80), Duration::from_millis(300)).is_ok()
        },
    );
    checks.run(
        "11 UDP: a client on a fixed port reaches the new endpoint at once",
        || {
            let first = ask_udp(&c1, 40000, addr("10.96.0.17", 53), Duration::from_secs(2))
                .map_err(|e| format!("before: {e:#}"))?;
            expect(first.backend == "b1", || format!("before: {first:?}"))?;
            publish(c, flip(&[b2()], &[b1(), b2()]));
            // Until the change is programmed b1 may still answer; after it, b2 must at once
            // (a stale conntrack entry would keep sending to b1, or to nothing, for minutes).
            let started = Instant::now();
            loop {
                let a = ask_udp(
                    &c1,
                    40000,
                    addr("10.96.0.17", 53),
                    Duration::from_millis(500),
                );
                if matches!(&a, Ok(Answer { backend, .. }) if backend == "b2") {
                    break;
                }
                if started.elapsed() > patience(Duration::from_secs(3)) {
                    return Err(format!("still {a:?} 3 s after the endpoint changed"));
                }
            }
            Ok(())
        },
    );
    checks.run(
        "9 terminating: no new connections while ready ones exist; old ones live on",
        || {
            // An established connection to b2, then b2 starts terminating.
            let mut conn = connection_to(&c1, addr("10.96.0.18", 80), "b2")?;
            let b2_terminating = Ep::terminating(pod_ip(c, "b2", true), "node2");
            publish(c, flip(&[b2()], &[b1(), b2_terminating.clone()]));
            wait_until(
                "only b1 for new connections",
                Duration::from_secs(5),
                || ask_many(&c1, addr("10.96.0.18", 80), 10).is_ok_and(|(b, _)| b == set(&["b1"])),
            )?;
            let reply = echo(&mut conn, "still there").map_err(|e| format!("{e:#}"))?;
            expect(reply == "b2 still there", || {
                format!("established connection: {reply:?}")
            })?;
            // Only the terminating one left: it is used (kube-proxy's fallback).
            publish(c, flip(&[b2()], &[b2_terminating]));
            wait_until(
                "the serving terminating endpoint",
                Duration::from_secs(5),
                || ask_many(&c1, addr("10.96.0.18", 80), 5).is_ok_and(|(b, _)| b == set(&["b2"])),
            )
        },
    );
    checks.run(
        "topology hints: each node's zone, from its Node's label, picks the hinted endpoint",
        || {
            let node = |name: &str, zone: &str| {
                json!({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})
            };
            let mut objects = services(c);
            objects.push(service_object(
                "topo",
                &["10.96.0.19"],
                &[("http", "TCP", 80, None)],
            ));
            let mut slices = slice_objects("topo", &http, &[b1(), b2()]);
            for (endpoint, zone) in slices[0]["endpoints"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .zip(["a", "b"])
            {
                endpoint["zone"] = json!(zone);
                endpoint["hints"] = json!({"forZones": [{"name": zone}]});
            }
            objects.extend(slices);
            let dir = c.services.path();
            write_objects(
                dir,
                "nodes.json",
                vec![node("node1", "a"), node("node2", "b")],
            )
            .map_err(|e| format!("{e:#}"))?;
            publish(c, objects);
            let node2 = c.nodes[1].netns.clone();
            let reaches = |netns: &str, want: &[&str]| {
                ask_many(netns, addr("10.96.0.19", 80), 10).is_ok_and(|(b, _)| b == set(want))
            };
            wait_until(
                "node1's pod on b1 (zone a), node2 on b2 (zone b)",
                Duration::from_secs(5),
                || reaches(&c1, &["b1"]) && reaches(&node2, &["b2"]),
            )?;
            // node1 moves to zone b: a label change alone moves its traffic.
            write_objects(
                dir,
                "nodes.json",
                vec![node("node1", "b"), node("node2", "b")],
            )
            .map_err(|e| format!("{e:#}"))?;
            wait_until(
                "node1's pod on b2 after its node's relabel",
                Duration::from_secs(5),
                || reaches(&c1, &["b2"]),
            )
        },
    );
}

/// Item 14: a restart (kill -9) keeps established connections and rewrites nothing;
/// switching modes removes the old mode's objects; --proxy-cleanup removes all.
fn restart_and_switch(mode: &str) {
    let Some(mut c) = cluster(mode, false) else {
        return;
    };
    publish(&c, services(&c));
    wait_for_web(&c);
    let c1 = netns_of(&c, "c1");
    let node1 = c.nodes[0].netns.clone();
    let listing = |c: &Cluster| -> String {
        let ns = &c.nodes[0].netns;
        if mode == "nftables" {
            // Handles change when a rule is rewritten.
            must(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "nft",
                    "-a",
                    "-t",
                    "list",
                    "table",
                    "ip",
                    "calyx-proxy",
                ],
            )
        } else {
            // Counters reset when a chain is rewritten.
            must(
                "ip",
                &["netns", "exec", ns, "iptables-save", "-c", "-t", "nat"],
            )
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
            .collect::<Vec<_>>()
            .join("\n")
        }
    };
    let nat_prerouting = || {
        must(
            "ip",
            &[
                "netns",
                "exec",
                &node1,
                "iptables",
                "-t",
                "nat",
                "-S",
                "PREROUTING",
            ],
        )
    };
    // Rules lost by hand come back at the next periodic check (every second here; the
    // full sync, hourly, is not what brings them back).
    if mode == "nftables" {
        must(
            "ip",
            &[
                "netns",
                "exec",
                &node1,
                "nft",
                "delete",
                "table",
                "ip",
                "calyx-proxy",
            ],
        );
    } else {
        let prerouting = nat_prerouting();
        let jump = prerouting
            .lines()
            .find(|l| l.contains("-j KUBE-SERVICES"))
            .unwrap_or_else(|| panic!("no jump to KUBE-SERVICES:\n{prerouting}"));
        // The rule as -S prints it, quotes and all: the shell splits it.
        let delete = format!("iptables -t nat {}", jump.replacen("-A", "-D", 1));
        must("ip", &["netns", "exec", &node1, "sh", "-c", &delete]);
    }
    wait_until(
        "the Service answering again after its rules were deleted by hand",
        Duration::from_secs(10),
        || ask_tcp_within(&c1, addr("10.96.0.10", 80), Duration::from_millis(500)).is_ok(),
    )
    .unwrap();
    if mode != "nftables" {
        // In IPVS mode a pod reaches a ClusterIP without the nat jump (it only marks
        // for masquerade): wait for the jump itself.
        wait_until(
            "the jump to KUBE-SERVICES back",
            Duration::from_secs(10),
            || nat_prerouting().contains("-j KUBE-SERVICES"),
        )
        .unwrap();
        // The proxy's filter jumps go above the overlay's at its next check when the
        // overlay inserted its own after the proxy's first; only then is everything
        // as wanted, and a restart must write nothing.
        wait_until(
            "the proxy's jumps first in FORWARD",
            Duration::from_secs(15),
            || {
                ["iptables", "ip6tables"].iter().all(|tool| {
                    let forward = must("ip", &["netns", "exec", &node1, tool, "-S", "FORWARD"]);
                    let rules: Vec<&str> = forward.lines().skip(1).collect();
                    let ours = rules.iter().rposition(|l| l.contains("-j KUBE-"));
                    let overlay = rules.iter().position(|l| l.contains("CALYX-FORWARD"));
                    matches!((ours, overlay), (Some(a), Some(b)) if a < b)
                })
            },
        )
        .unwrap();
    }
    let mut conn = connect_from(&c1, addr("10.96.0.10", 80)).unwrap();
    let who = read_greeting(&conn).unwrap().backend;
    let before = listing(&c);
    let log = c.node_state_dir(&c.nodes[0]).join("agent.log");
    let log_before = std::fs::read_to_string(&log).unwrap().len();
    c.signal_agent(0, "KILL").unwrap();
    c.start_agent(0).unwrap();
    // Ready again (the proxy synced), then nothing may have been rewritten.
    wait_until("node1's agent ready", Duration::from_secs(20), || {
        http_status(&node1, addr("127.0.0.1", 9099), "/readyz").is_some_and(|(s, _)| s == 200)
    })
    .unwrap();
    assert_eq!(
        echo(&mut conn, "after restart").unwrap(),
        format!("{who} after restart"),
        "the established connection through the Service broke"
    );
    let after = listing(&c);
    if mode == "nftables" {
        assert_eq!(before, after, "the restart rewrote rules that were right");
    } else {
        // A rewritten chain starts counting from zero again: no counter went down.
        let counters = |text: &str| -> Vec<(u64, String)> {
            text.lines()
                .filter_map(|l| {
                    let (count, rule) = l.strip_prefix('[')?.split_once("] ")?;
                    Some((count.split(':').next()?.parse().ok()?, rule.to_string()))
                })
                .collect()
        };
        let (was, now) = (counters(&before), counters(&after));
        assert_eq!(
            was.len(),
            now.len(),
            "rules changed:\n{before}\n---\n{after}"
        );
        for ((a, rule), (b, _)) in was.iter().zip(&now) {
            assert!(b >= a, "counter of {rule} went from {a} to {b}: rewritten");
        }
        assert!(
            was.iter()
                .any(|(n, r)| *n > 0 && (r.contains("KUBE-SVC") || r.contains("KUBE-CLUSTER-IP"))),
            "{before}"
        );
    }
    // The first sync after the restart read the kernel and found nothing to write.
    let since = std::fs::read_to_string(&log).unwrap()[log_before..].to_string();
    let first = since
        .lines()
        .find(|l| l.contains("service proxy synced"))
        .unwrap_or_else(|| panic!("no sync after the restart:\n{since}"));
    assert!(
        first.contains("writes=0"),
        "the restart wrote to the kernel: {first}"
    );

    // Switch modes: the other mode's objects are removed at start.
    let other = if mode == "nftables" {
        "iptables"
    } else {
        "nftables"
    };
    c.signal_agent(0, "KILL").unwrap();
    let at = c.agent_args.iter().position(|a| a == mode).unwrap();
    c.agent_args[at] = other.to_string();
    c.start_agent(0).unwrap();
    wait_until(
        "node1 serving in the other mode",
        Duration::from_secs(20),
        || {
            ask_tcp_within(&c1, addr("10.96.0.10", 80), Duration::from_millis(500)).is_ok()
                && http_status(&node1, addr("127.0.0.1", 9099), "/readyz")
                    .is_some_and(|(s, _)| s == 200)
        },
    )
    .unwrap();
    let nft = sh(
        "ip",
        &[
            "netns",
            "exec",
            &node1,
            "nft",
            "list",
            "table",
            "ip",
            "calyx-proxy",
        ],
    );
    let nat = must(
        "ip",
        &["netns", "exec", &node1, "iptables-save", "-t", "nat"],
    );
    if other == "iptables" {
        assert!(
            !nft.status.success(),
            "the nftables table survived the switch"
        );
        assert!(nat.contains("KUBE-SERVICES"), "{nat}");
    } else {
        assert!(nft.status.success(), "no nftables table after the switch");
        assert!(
            !nat.contains("KUBE-"),
            "iptables chains survived the switch:\n{nat}"
        );
    }
    if mode == "ipvs" {
        assert_ipvs_gone(&node1, "the switch");
    }

    // --proxy-cleanup removes everything either mode made; pod traffic still works.
    c.signal_agent(0, "KILL").unwrap();
    let agent = c.agent.clone().unwrap();
    must(
        "ip",
        &[
            "netns",
            "exec",
            &node1,
            agent.to_str().unwrap(),
            "--proxy-cleanup",
        ],
    );
    let nft = sh("ip", &["netns", "exec", &node1, "nft", "list", "tables"]);
    assert!(!String::from_utf8_lossy(&nft.stdout).contains("calyx-proxy"));
    let all = must("ip", &["netns", "exec", &node1, "iptables-save"]);
    assert!(!all.contains("KUBE-"), "{all}");
    assert!(
        all.contains("CALYX-FORWARD"),
        "the overlay's rules must stay:\n{all}"
    );
    assert_ipvs_gone(&node1, "--proxy-cleanup");
    let answer = ask_tcp(&c1, addr(&pod_ip(&c, "b2", true), BACKEND_PORT)).unwrap();
    assert_eq!(answer.backend, "b2");
}

/// No kube-ipvs0, no KUBE-* ipset, no virtual service on a Service address.
fn assert_ipvs_gone(netns: &str, after: &str) {
    let link = sh("ip", &["-n", netns, "link", "show", "kube-ipvs0"]);
    assert!(!link.status.success(), "kube-ipvs0 survived {after}");
    let sets = sh("ip", &["netns", "exec", netns, "ipset", "list", "-n"]);
    let sets = String::from_utf8_lossy(&sets.stdout);
    assert!(!sets.contains("KUBE-"), "ipsets survived {after}:\n{sets}");
    if std::path::Path::new("/proc/net/ip_vs").exists() {
        let ipvs = must("ip", &["netns", "exec", netns, "ipvsadm", "-Ln"]);
        assert!(
            !ipvs.contains("10.96."),
            "virtual services survived {after}:\n{ipvs}"
        );
    }
}

#[test]
fn nftables_mode_every_path() {
    every_path("nftables", false);
}

#[test]
fn iptables_mode_every_path() {
    every_path("iptables", false);
}

#[test]
fn nftables_mode_every_path_on_etcd() {
    every_path("nftables", true);
}

#[test]
fn nftables_mode_restart_switch_and_cleanup() {
    restart_and_switch("nftables");
}

#[test]
fn iptables_mode_restart_switch_and_cleanup() {
    restart_and_switch("iptables");
}

/// IPVS mode needs a kernel with IPVS and dummy links: these run inside the VM
/// (`make test-vm`, part of `make test`), where a missing IPVS fails them.
fn ipvs_kernel() -> bool {
    let ok = std::path::Path::new("/proc/net/ip_vs").exists();
    if !ok {
        if std::env::var_os("CALYX_IN_VM").is_some() || std::env::var_os("CI").is_some() {
            panic!("IPVS test cannot run: this kernel has no IPVS (/proc/net/ip_vs)");
        }
        eprintln!("skipped: this kernel has no IPVS; run `make test-vm`");
    }
    ok
}

#[test]
#[ignore = "needs IPVS: runs in the VM (make test-vm)"]
fn ipvs_mode_every_path() {
    if ipvs_kernel() {
        every_path("ipvs", false);
    }
}

#[test]
#[ignore = "needs IPVS: runs in the VM (make test-vm)"]
fn ipvs_mode_restart_switch_and_cleanup() {
    if ipvs_kernel() {
        restart_and_switch("ipvs");
    }
}
