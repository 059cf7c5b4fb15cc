//! NetworkPolicy end to end: two real node namespaces with agents reading a
//! --services-dir of Pods, Namespaces and NetworkPolicies, the upstream e2e layout
//! (namespaces x, y, z; pods a, b, c; servers on TCP and UDP 80 and 81; a on node1,
//! b and c on node2), and real packets: for each policy, the whole truth table is
//! probed until it is what the API says, or the test fails with the cells that differ.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use calyx_e2e::cluster::{Cluster, ClusterSpec, POOL_V4, POOL_V6};
use calyx_e2e::lab::{must, privileged};
use calyx_e2e::objects::{namespace_object, pod_object};
use calyx_e2e::services::{ask_tcp_within, ask_udp, tcp_backend, udp_backend, write_objects};
use serde_json::{json, Value};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

struct Lab {
    cluster: Cluster,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Cluster::destroy(&self.cluster.prefix);
    }
}

fn binaries() -> (PathBuf, PathBuf) {
    calyx_e2e::cluster::binaries_beside(env!("CARGO_BIN_EXE_calyx-agent"))
}

/// The lab's name of pod `ns/pod`.
fn lab_name(ns: &str, pod: &str) -> String {
    format!("{ns}-{pod}")
}

impl Lab {
    fn start(extra_args: &[&str]) -> Option<Lab> {
        if !privileged() {
            return None;
        }
        let (plugin, agent) = binaries();
        let dir = tempfile::tempdir().unwrap();
        let mut agent_args = vec![
            "--resync-seconds".to_string(),
            "5".into(),
            "--proxy-sync-seconds".into(),
            "1".into(),
            "--services-dir".into(),
            dir.path().display().to_string(),
        ];
        agent_args.extend(extra_args.iter().map(|s| s.to_string()));
        let spec = ClusterSpec {
            prefix: format!(
                "cyxn{}x{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ),
            plugin,
            agent: Some(agent),
            pools: vec![POOL_V4.to_string(), POOL_V6.to_string()],
            block_size: None,
            agent_args,
            nodes: 2,
            etcd: false,
        };
        let cluster = match Cluster::create(&spec) {
            Ok(c) => c,
            Err(e) => {
                let _ = Cluster::destroy(&spec.prefix);
                panic!("cluster: {e:#}");
            }
        };
        let mut lab = Lab { cluster, dir };
        for node in &lab.cluster.nodes {
            // Another ruleset's FORWARD policy DROP: allowed traffic must still pass.
            for tool in ["iptables", "ip6tables"] {
                must(
                    "ip",
                    &["netns", "exec", &node.netns, tool, "-P", "FORWARD", "DROP"],
                );
            }
        }
        let mut objects = Vec::new();
        for ns in NAMESPACES {
            objects.push(namespace_object(ns, &[("ns", ns)]));
            for (i, pod) in PODS.iter().enumerate() {
                let node = if i == 0 { 0 } else { 1 };
                let p = lab.cluster.add_pod(node, &lab_name(ns, pod)).unwrap();
                for port in [80, 81] {
                    tcp_backend(&p.netns, &lab_name(ns, pod), port).unwrap();
                    udp_backend(&p.netns, &lab_name(ns, pod), port).unwrap();
                }
                objects.push(pod_object(
                    ns,
                    pod,
                    &lab.cluster.nodes[node].name,
                    &p.ips,
                    &[("pod", pod)],
                    &[
                        ("serve-80-tcp", 80, "TCP"),
                        ("serve-81-tcp", 81, "TCP"),
                        ("serve-80-udp", 80, "UDP"),
                    ],
                ));
            }
        }
        write_objects(lab.dir.path(), "pods.json", objects).unwrap();
        Some(lab)
    }

    fn policies(&self, policies: Vec<Value>) {
        write_objects(self.dir.path(), "policies.json", policies).unwrap();
    }

    fn pod(&self, ns: &str, pod: &str) -> &calyx_e2e::cluster::Pod {
        let name = lab_name(ns, pod);
        self.cluster
            .pods
            .iter()
            .find(|p| p.name == name)
            .expect("a lab pod")
    }
}

/// The value of the first /metrics line of node `node` that starts with `series`.
fn metric(lab: &Lab, node: usize, series: &str) -> Option<f64> {
    let addr: SocketAddr = "127.0.0.1:9099".parse().unwrap();
    let (_, page) = calyx_e2e::sockets::http_get(&lab.cluster.nodes[node].netns, addr, "/metrics")?;
    page.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
}

/// One cell: (from, to, protocol, port, IPv6).
type Cell = (String, String, Proto, u16, bool);

/// Every ordered pair of distinct pods on `ports`, over IPv4 and, where `v6`, IPv6.
fn cells(ports: &[(Proto, u16)], v6: bool) -> Vec<Cell> {
    let mut cells = Vec::new();
    for fns in NAMESPACES {
        for fpod in PODS {
            for tns in NAMESPACES {
                for tpod in PODS {
                    if (fns, fpod) == (tns, tpod) {
                        continue;
                    }
                    for &(proto, port) in ports {
                        for six in [false, true] {
                            if !six || v6 {
                                cells.push((
                                    format!("{fns}/{fpod}"),
                                    format!("{tns}/{tpod}"),
                                    proto,
                                    port,
                                    six,
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    cells
}

/// Probes `cells` in parallel, each given `wait` to answer.
fn probe(lab: &Lab, cells: &[Cell], wait: Duration) -> BTreeMap<Cell, bool> {
    if cells.is_empty() {
        return BTreeMap::new();
    }
    let results: Vec<(Cell, bool)> = std::thread::scope(|s| {
        cells
            .chunks(cells.len().div_ceil(24))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|cell| {
                            let (from, to, proto, port, six) = cell;
                            let (fns, fpod) = from.split_once('/').unwrap();
                            let (tns, tpod) = to.split_once('/').unwrap();
                            let src = lab.pod(fns, fpod);
                            let dst = lab.pod(tns, tpod);
                            let ip = dst
                                .ips
                                .iter()
                                .find(|ip| ip.contains(':') == *six)
                                .expect("an address of the family");
                            let addr = SocketAddr::new(ip.parse().unwrap(), *port);
                            let answer = match proto {
                                Proto::Tcp => ask_tcp_within(&src.netns, addr, wait),
                                Proto::Udp => ask_udp(&src.netns, 0, addr, wait),
                            };
                            let ok = answer.is_ok_and(|a| a.backend == dst.name);
                            (cell.clone(), ok)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().expect("probe thread"))
            .collect()
    });
    results.into_iter().collect()
}

/// Waits (up to 10 s) until every probed cell is as `allowed` says; fails naming
/// the cells that differ.
fn expect_truth_table(
    lab: &Lab,
    what: &str,
    ports: &[(Proto, u16)],
    v6: bool,
    allowed: impl Fn(&str, &str, Proto, u16) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let all = cells(ports, v6);
    loop {
        let mut got = probe(lab, &all, Duration::from_millis(700));
        // A cell that should reach and did not gets a second, longer try: on two
        // busy cores a connection can take longer than the first wait.
        let slow: Vec<Cell> = got
            .iter()
            .filter(|((from, to, proto, port, _), ok)| !**ok && allowed(from, to, *proto, *port))
            .map(|(cell, _)| cell.clone())
            .collect();
        got.extend(probe(lab, &slow, Duration::from_secs(3)));
        let wrong: Vec<String> = got
            .iter()
            .filter(|((from, to, proto, port, _), ok)| **ok != allowed(from, to, *proto, *port))
            .map(|((from, to, proto, port, six), ok)| {
                format!(
                    "{from} -> {to} {proto:?}/{port}{}: {}",
                    if *six { " (IPv6)" } else { "" },
                    if *ok {
                        "reached, should not"
                    } else {
                        "blocked, should reach"
                    }
                )
            })
            .collect();
        if wrong.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let log = lab.cluster.agent_log_tail(0, 30);
            panic!(
                "{what}: {} of {} cells wrong:\n{}\nnode1's agent:\n{log}\nnode1's table:\n{}",
                wrong.len(),
                got.len(),
                wrong.join("\n"),
                String::from_utf8_lossy(
                    &std::process::Command::new("ip")
                        .args(["netns", "exec", &lab.cluster.nodes[0].netns, "sh", "-c", "nft list ruleset; conntrack -L | head -20; sysctl net.netfilter.nf_conntrack_tcp_loose"])
                        .output()
                        .unwrap()
                        .stdout
                )
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ns_of(pod: &str) -> &str {
    pod.split_once('/').unwrap().0
}

fn name_of(pod: &str) -> &str {
    pod.split_once('/').unwrap().1
}

#[test]
fn the_upstream_truth_tables_hold_with_real_packets() {
    let Some(lab) = Lab::start(&[]) else {
        return;
    };
    let tcp = [(Proto::Tcp, 80), (Proto::Tcp, 81)];

    // No policies: everything reaches everything, both families.
    expect_truth_table(&lab, "no policies", &tcp, true, |_, _, _, _| true);

    // Default deny ingress in x: nothing reaches x's pods, from anywhere.
    lab.policies(vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-all", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": []},
    })]);
    expect_truth_table(&lab, "deny all ingress in x", &tcp, true, |_, to, _, _| {
        ns_of(to) != "x"
    });

    // x/a takes TCP 80 from namespace y only (namespaceSelector, a port), and the
    // rest of x stays denied; policies add up.
    lab.policies(vec![
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": []},
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-y-80", "namespace": "x"},
            "spec": {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{
                    "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    "ports": [{"port": 80}],
                }],
            },
        }),
    ]);
    let udp_too = [(Proto::Tcp, 80), (Proto::Tcp, 81), (Proto::Udp, 80)];
    expect_truth_table(
        &lab,
        "x/a from namespace y on TCP 80",
        &udp_too,
        true,
        |from, to, proto, port| {
            ns_of(to) != "x"
                || (to == "x/a" && ns_of(from) == "y" && proto == Proto::Tcp && port == 80)
        },
    );
    // What the kernel counted is on /metrics (x/a lives on node1).
    let allowed = metric(
        &lab,
        0,
        r#"calyx_agent_policy_allowed_packets_total{namespace="x",policy="allow-y-80",direction="ingress"}"#,
    );
    assert!(allowed.is_some_and(|n| n > 0.0), "allowed: {allowed:?}");
    let denied = metric(
        &lab,
        0,
        r#"calyx_agent_policy_denied_packets_total{namespace="x",direction="ingress"}"#,
    );
    assert!(denied.is_some_and(|n| n > 0.0), "denied: {denied:?}");

    // Egress: y's pods may send only to pods labelled a, on the port named
    // serve-81-tcp (81 on every pod). policyTypes says Egress alone: without it the
    // API defaults Ingress in too, and y would take nothing.
    lab.policies(vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "egress-to-a-81", "namespace": "y"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{
                "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}],
                "ports": [{"port": "serve-81-tcp"}],
            }],
        },
    })]);
    expect_truth_table(
        &lab,
        "y may send only to pods a on serve-81-tcp",
        &tcp,
        true,
        |from, to, _, port| ns_of(from) != "y" || (name_of(to) == "a" && port == 81),
    );

    // ipBlock with except, for pod addresses: x/b takes everything from the pod
    // range except z/c's address.
    let zc = lab.pod("z", "c").ips[0].clone();
    // With an invalid policy beside it: refused, logged with its file and field,
    // counted; the valid one is enforced all the same.
    let refused_before = metric(&lab, 0, "calyx_agent_policy_refused_total").unwrap_or(0.0);
    lab.policies(vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bogus", "namespace": "x"},
        "spec": {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Near", "values": ["a"]}]}, "ingress": []},
    }), json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "block", "namespace": "x"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "b"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": POOL_V4, "except": [format!("{zc}/32")]}}]}],
        },
    })]);
    expect_truth_table(
        &lab,
        "x/b from the pod range except z/c",
        &tcp,
        false,
        |from, to, _, _| to != "x/b" || from != "z/c",
    );
    let refused = metric(&lab, 0, "calyx_agent_policy_refused_total").unwrap_or(0.0);
    assert!(
        refused > refused_before,
        "refused {refused_before} -> {refused}"
    );
    let log = lab.cluster.agent_log_tail(0, 400);
    assert!(
        log.lines()
            .any(|l| l.contains("policies.json") && l.contains("bogus") && l.contains("operator")),
        "no log line names the file, the object and the field:\n{log}"
    );
}

/// The packets `node`'s spoofing guard has dropped.
fn spoofed_count(lab: &Lab, node: usize) -> u64 {
    let out = must(
        "ip",
        &[
            "netns",
            "exec",
            &lab.cluster.nodes[node].netns,
            "nft",
            "-j",
            "list",
            "counter",
            "inet",
            "calyx-policy",
            "spoofed",
        ],
    );
    let json: Value = serde_json::from_str(&out).expect("nft's JSON");
    json["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
        .expect("the spoofed counter")
}

#[test]
fn a_pod_sends_only_from_its_own_addresses_without_any_policy() {
    let Some(lab) = Lab::start(&[]) else {
        return;
    };
    let node1 = &lab.cluster.nodes[0];
    calyx_e2e::lab::wait_until("the spoofing guard", Duration::from_secs(10), || {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &node1.netns,
                "nft",
                "list",
                "chain",
                "inet",
                "calyx-policy",
                "pod-sources",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let sender = lab.pod("x", "a").clone();
    let receiver = lab.pod("x", "b").clone();
    let receiving: Vec<std::net::UdpSocket> = receiver
        .ips
        .iter()
        .map(|ip| {
            let addr = SocketAddr::new(ip.parse().unwrap(), 9999);
            calyx_e2e::sockets::in_netns(&receiver.netns, move || {
                let s = std::net::UdpSocket::bind(addr)?;
                s.set_read_timeout(Some(Duration::from_millis(300)))?;
                Ok(s)
            })
            .unwrap()
        })
        .collect();

    // Its own addresses, and those of a pod on its node, a pod on the other node, its
    // node and the outside world, in both families.
    let family = |pod: &calyx_e2e::cluster::Pod, v6: bool| {
        pod.ips
            .iter()
            .find(|ip| ip.contains(':') == v6)
            .unwrap()
            .clone()
    };
    let mut sources = Vec::new();
    for v6 in [false, true] {
        sources.push((family(&sender, v6), true));
        sources.push((family(lab.pod("y", "a"), v6), false));
        sources.push((family(lab.pod("z", "c"), v6), false));
        sources.push((
            if v6 {
                "2001:db8::7".into()
            } else {
                "192.0.2.7".into()
            },
            false,
        ));
    }
    sources.push((node1.underlay_ip.clone(), false));
    let before = spoofed_count(&lab, 0);
    let mut spoofed_sent = 0;
    for (source, own) in &sources {
        let v6 = source.contains(':');
        let prefix = if v6 { "/128" } else { "/32" };
        let with_prefix = format!("{source}{prefix}");
        if !own {
            let mut args = vec![
                "-n",
                &sender.netns,
                "addr",
                "add",
                &with_prefix,
                "dev",
                "eth0",
            ];
            if v6 {
                args.push("nodad");
            }
            must("ip", &args);
        }
        let to = SocketAddr::new(family(&receiver, v6).parse().unwrap(), 9999);
        let from = SocketAddr::new(source.parse().unwrap(), 0);
        let socket =
            calyx_e2e::sockets::in_netns(&sender.netns, move || std::net::UdpSocket::bind(from))
                .unwrap();
        for _ in 0..3 {
            socket.send_to(source.as_bytes(), to).unwrap();
        }
        if !own {
            spoofed_sent += 3;
            must(
                "ip",
                &[
                    "-n",
                    &sender.netns,
                    "addr",
                    "del",
                    &with_prefix,
                    "dev",
                    "eth0",
                ],
            );
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for socket in &receiving {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            assert_eq!(
                &buf[..n],
                from.ip().to_string().as_bytes(),
                "the source it claims"
            );
            seen.insert(from.ip().to_string());
        }
    }
    let own: std::collections::BTreeSet<String> = sender.ips.iter().cloned().collect();
    assert_eq!(seen, own, "only the sender's own addresses arrive");
    let dropped = spoofed_count(&lab, 0) - before;
    assert!(
        dropped >= spoofed_sent,
        "node1's guard counted {dropped} of the {spoofed_sent} spoofed packets"
    );
    let on_metrics = metric(&lab, 0, "calyx_agent_policy_spoofed_packets_total");
    assert!(
        on_metrics.is_some_and(|n| n >= dropped as f64),
        "/metrics: {on_metrics:?}, the kernel: {dropped}"
    );
}

/// The group of the host veth routed to `ip` on `node`.
fn veth_group(lab: &Lab, node: usize, ip: &str) -> u64 {
    let netns = &lab.cluster.nodes[node].netns;
    let route = must("ip", &["-n", netns, "-j", "route", "get", ip]);
    let route: Value = serde_json::from_str(&route).unwrap();
    let dev = route[0]["dev"].as_str().unwrap().to_string();
    let link = must("ip", &["-n", netns, "-j", "-d", "link", "show", &dev]);
    let link: Value = serde_json::from_str(&link).unwrap();
    match &link[0]["group"] {
        Value::String(name) if name == "default" => 0,
        Value::String(number) => number.parse().unwrap(),
        other => other.as_u64().unwrap(),
    }
}

/// Whether `from` (netns) reaches the TCP server `name` at `ip`:80, within `wait`.
fn reaches(from: &str, ip: &str, name: &str, wait: Duration) -> bool {
    let addr = SocketAddr::new(ip.parse().unwrap(), 80);
    ask_tcp_within(from, addr, wait).is_ok_and(|a| a.backend == name)
}

/// Until `since` + `window`, probes from `blocked` without pause (failing if it
/// ever reaches `ip`) and, beside it, from `allowed` every few milliseconds: how
/// long after `since` `allowed` first reached it, if it did.
fn watch_new_pod(
    since: Instant,
    blocked: &str,
    allowed: &str,
    ip: &str,
    name: &str,
    window: Duration,
) -> Option<Duration> {
    std::thread::scope(|s| {
        let denied = s.spawn(|| {
            while since.elapsed() < window {
                if reaches(blocked, ip, name, Duration::from_millis(50)) {
                    return Some(since.elapsed());
                }
            }
            None
        });
        let mut first_allowed = None;
        while first_allowed.is_none() && since.elapsed() < window {
            if reaches(allowed, ip, name, Duration::from_millis(10)) {
                first_allowed = Some(since.elapsed());
            }
        }
        if let Some(after) = denied.join().unwrap() {
            panic!("a denied peer reached the new pod {name} {after:?} after ADD");
        }
        first_allowed
    })
}

#[test]
fn a_new_pod_is_judged_from_its_first_packet_and_isolation_holds_while_the_agent_is_down() {
    let Some(mut lab) = Lab::start(&[]) else {
        return;
    };
    let node1_state = lab.cluster.node_state_dir(&lab.cluster.nodes[0]);
    // x takes ingress from y only; z has no policy.
    lab.policies(vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "from-y", "namespace": "x"},
        "spec": {
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
        },
    })]);
    let (yb, zb) = (
        lab.pod("y", "b").netns.clone(),
        lab.pod("z", "b").netns.clone(),
    );
    let xa = lab.pod("x", "a").ips[0].clone();
    calyx_e2e::lab::wait_until("x isolated", Duration::from_secs(10), || {
        !reaches(&zb, &xa, "x-a", Duration::from_millis(300))
            && std::fs::read_to_string(node1_state.join("policy-namespaces"))
                .is_ok_and(|t| t.lines().any(|l| l == "x"))
    });
    // The new pods' objects exist before their sandboxes, as the scheduler makes
    // them, and without addresses: the agent has them from the IPAM store only.
    let node1 = lab.cluster.nodes[0].name.clone();
    let new_pods: Vec<Value> = [("x", "d"), ("z", "d"), ("x", "e")]
        .iter()
        .map(|(ns, pod)| pod_object(ns, pod, &node1, &[], &[("pod", pod)], &[]))
        .collect();
    write_objects(lab.dir.path(), "new-pods.json", new_pods).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // x/d: never reached by z/b, from its first packet on; reached by y/b within 1 s.
    let xd = lab.cluster.add_pod_as(0, "x-d", ("x", "d")).unwrap();
    let added = Instant::now();
    tcp_backend(&xd.netns, "x-d", 80).unwrap();
    let first = watch_new_pod(added, &zb, &yb, &xd.ips[0], "x-d", Duration::from_secs(2))
        .expect("y/b never reached the new pod x/d");
    eprintln!("y/b reached the new pod x/d {first:?} after ADD returned");
    assert!(
        first < Duration::from_secs(1),
        "y/b reached x/d only {first:?} after ADD"
    );
    assert_eq!(veth_group(&lab, 0, &xd.ips[0]), 0, "x/d released");

    // The agent killed: the kernel goes on enforcing. x/e, added meanwhile, is held:
    // nobody but its node reaches it; z/d, in a namespace without policies, is not.
    lab.cluster.signal_agent(0, "KILL").unwrap();
    let xe = lab.cluster.add_pod_as(0, "x-e", ("x", "e")).unwrap();
    tcp_backend(&xe.netns, "x-e", 80).unwrap();
    let zd = lab.cluster.add_pod_as(0, "z-d", ("z", "d")).unwrap();
    tcp_backend(&zd.netns, "z-d", 80).unwrap();
    assert_eq!(
        veth_group(&lab, 0, &xe.ips[0]),
        u64::from(calyx_dataplane::HELD_POD_GROUP),
        "x/e held"
    );
    assert_eq!(veth_group(&lab, 0, &zd.ips[0]), 0, "z/d never held");
    let node1_ns = lab.cluster.nodes[0].netns.clone();
    let wait = Duration::from_millis(700);
    assert!(
        reaches(&zb, &zd.ips[0], "z-d", Duration::from_secs(3)),
        "z/d at once"
    );
    assert!(!reaches(&yb, &xe.ips[0], "x-e", wait), "held x/e from y/b");
    assert!(!reaches(&zb, &xe.ips[0], "x-e", wait), "held x/e from z/b");
    assert!(
        reaches(&node1_ns, &xe.ips[0], "x-e", Duration::from_secs(3)),
        "x/e from its node"
    );
    assert!(
        !reaches(&xe.netns, &zd.ips[0], "z-d", wait),
        "held x/e sends nothing"
    );
    assert!(
        !reaches(&zb, &xa, "x-a", wait),
        "x/a still isolated, agent down"
    );
    assert!(
        reaches(&yb, &xa, "x-a", Duration::from_secs(3)),
        "x/a still takes y"
    );

    // The agent back: x/e is released and judged by x's policy.
    lab.cluster.start_agent(0).unwrap();
    calyx_e2e::lab::wait_until("x/e released", Duration::from_secs(15), || {
        reaches(&yb, &xe.ips[0], "x-e", Duration::from_millis(500))
    });
    assert!(
        !reaches(&zb, &xe.ips[0], "x-e", wait),
        "x/e from z/b, agent back"
    );
    assert!(!reaches(&zb, &xa, "x-a", wait), "x/a from z/b, agent back");
}
