//! A packet tracer over the policy table as the recording fake holds it: the packet
//! goes through the base chains of its hook in priority order, and every rule it
//! meets is interpreted (address and port matches, named and anonymous sets, concat
//! lookups, verdict maps, counters, jumps and gotos). A rule it does not understand
//! is an error, so no rule of the table passes a test unread.
//!
//! The property test at the bottom holds the table to the model: for random pods,
//! namespaces, labels and policies, every flow's fate across the nodes it crosses
//! equals `verdict`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use calyx_dataplane::firewall::nft::Table;
use ipnetwork::IpNetwork;

use super::model::Protocol;

#[derive(Debug, Clone)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    /// A packet of a connection conntrack has seen both ways.
    pub established: bool,
}

/// What one node's table did with the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    Passed,
    /// Dropped in `chain`, counted in `counter`.
    Dropped {
        chain: String,
        counter: Option<String>,
    },
}

/// What the tracer knows of a node: its own addresses, and the interface its route
/// to each local pod leaves by (the plugin's host routes, what `fib` looks up).
pub struct Node<'a> {
    pub local: &'a [IpAddr],
    pub pod_routes: &'a BTreeMap<IpAddr, String>,
    /// The pods' veths still held (`HELD_POD_GROUP`).
    pub held: &'a std::collections::BTreeSet<String>,
}

/// The packet at `node`: through prerouting when it came in on `iif` (None: the node
/// sent it), then input when it is for the node, else postrouting.
pub fn traverse(
    table: &Table,
    node: &Node,
    iif: Option<&str>,
    packet: &Packet,
) -> Result<Fate, String> {
    let mut hooks = Vec::new();
    if iif.is_some() {
        hooks.push("prerouting");
    }
    hooks.push(if node.local.contains(&packet.dst) {
        "input"
    } else {
        "postrouting"
    });
    let tracer = Tracer {
        table,
        node,
        iif,
        packet,
    };
    for hook in hooks {
        for name in table.base_chains(hook) {
            let mut counter = None;
            match tracer.chain(name, &mut counter, 0)? {
                End::Drop(chain) => return Ok(Fate::Dropped { chain, counter }),
                End::Accept | End::Fallthrough => {}
            }
        }
    }
    Ok(Fate::Passed)
}

enum End {
    Accept,
    /// Dropped in this chain.
    Drop(String),
    /// Ran off the end (or returned).
    Fallthrough,
}

enum Step {
    Next,
    Accept,
    Drop,
    Jump(String),
    Goto(String),
    Return,
}

struct Tracer<'a> {
    table: &'a Table,
    node: &'a Node<'a>,
    iif: Option<&'a str>,
    packet: &'a Packet,
}

/// A value read from the packet; None when the selector's family is not the packet's.
fn family_value(word: &str, ip: IpAddr) -> Result<Option<String>, String> {
    match word {
        "ip" => Ok(ip.is_ipv4().then(|| ip.to_string())),
        "ip6" => Ok(ip.is_ipv6().then(|| ip.to_string())),
        other => Err(format!("unknown family word {other:?}")),
    }
}

impl Tracer<'_> {
    fn group(&self, interface: Option<&str>) -> u32 {
        match interface {
            Some(name) if self.node.held.contains(name) => calyx_dataplane::HELD_POD_GROUP,
            _ => 0,
        }
    }

    fn chain(&self, name: &str, counter: &mut Option<String>, depth: usize) -> Result<End, String> {
        if depth > 16 {
            return Err(format!("jumps nest too deep at {name}"));
        }
        let chain = self
            .table
            .chains
            .get(name)
            .ok_or_else(|| format!("no chain {name}"))?;
        for rule in &chain.rules {
            match self
                .rule(rule, counter)
                .map_err(|e| format!("{name}: {rule:?}: {e}"))?
            {
                Step::Next => {}
                Step::Accept => return Ok(End::Accept),
                Step::Drop => return Ok(End::Drop(name.to_string())),
                Step::Return => return Ok(End::Fallthrough),
                Step::Jump(target) => match self.chain(&target, counter, depth + 1)? {
                    End::Fallthrough => {}
                    end => return Ok(end),
                },
                Step::Goto(target) => return self.chain(&target, counter, depth + 1),
            }
        }
        Ok(End::Fallthrough)
    }

    /// One selector at `tokens[i..]`: its value (None: another family) and the
    /// tokens it took.
    fn selector(&self, tokens: &[&str], i: usize) -> Result<(Option<String>, usize), String> {
        let word = |k: usize| tokens.get(i + k).copied().unwrap_or("");
        Ok(match (word(0), word(1)) {
            (fam @ ("ip" | "ip6"), "saddr") => (family_value(fam, self.packet.src)?, 2),
            (fam @ ("ip" | "ip6"), "daddr") => (family_value(fam, self.packet.dst)?, 2),
            ("meta", "l4proto") => (Some(self.packet.protocol.name().to_string()), 2),
            ("th", "dport") => (Some(self.packet.port.to_string()), 2),
            // Sent by the node itself, a packet has no input interface to match.
            ("iifname", _) => (self.iif.map(str::to_string), 1),
            ("iifgroup", _) => (Some(self.group(self.iif).to_string()), 1),
            // The interface a forwarded packet leaves by: its route's.
            ("oifgroup", _) => {
                let oif = self
                    .node
                    .pod_routes
                    .get(&self.packet.dst)
                    .map(String::as_str);
                (Some(self.group(oif).to_string()), 1)
            }
            (a, b) => return Err(format!("unknown selector {a:?} {b:?}")),
        })
    }

    fn rule(&self, rule: &str, counter: &mut Option<String>) -> Result<Step, String> {
        let spaced = rule
            .replace('{', " { ")
            .replace('}', " } ")
            .replace(',', " , ");
        let tokens: Vec<&str> = spaced.split_whitespace().collect();
        let mut i = 0;
        let mut counted = None;
        while i < tokens.len() {
            let t = tokens[i];
            match t {
                "ct" => {
                    if tokens.get(i + 1..i + 5) != Some(&["state", "established", ",", "related"]) {
                        return Err("only `ct state established,related` is known".into());
                    }
                    if !self.packet.established {
                        return Ok(Step::Next);
                    }
                    i += 5;
                }
                "fib" => {
                    if tokens.get(i + 1..i + 4) == Some(&["saddr", "type", "local"]) {
                        if !self.node.local.contains(&self.packet.src) {
                            return Ok(Step::Next);
                        }
                        i += 4;
                    } else if tokens.get(i + 1..i + 6)
                        == Some(&["saddr", ".", "iif", "oif", "missing"])
                    {
                        // Strict reverse path: the route back to the source must leave
                        // by the interface the packet came in on.
                        let back = self
                            .node
                            .pod_routes
                            .get(&self.packet.src)
                            .map(String::as_str);
                        if self.iif.is_some() && back == self.iif {
                            return Ok(Step::Next);
                        }
                        i += 6;
                    } else {
                        return Err(
                            "only `fib saddr type local` and `fib saddr . iif oif missing` are known"
                                .into(),
                        );
                    }
                }
                "counter" => {
                    if tokens.get(i + 1) != Some(&"name") || i + 2 >= tokens.len() {
                        return Err("only named counters are known".into());
                    }
                    counted = Some(tokens[i + 2].to_string());
                    i += 3;
                }
                "accept" | "drop" | "return" => {
                    if i + 1 != tokens.len() {
                        return Err(format!("{t} is not the last word"));
                    }
                    *counter = counted.or(counter.take());
                    return Ok(match t {
                        "accept" => Step::Accept,
                        "drop" => Step::Drop,
                        _ => Step::Return,
                    });
                }
                "jump" | "goto" => {
                    let target = tokens
                        .get(i + 1)
                        .filter(|_| i + 2 == tokens.len())
                        .ok_or("a jump names one chain, last")?
                        .to_string();
                    return Ok(if t == "jump" {
                        Step::Jump(target)
                    } else {
                        Step::Goto(target)
                    });
                }
                _ => {
                    // A match: selector [. selector ...] then vmap, != or a value.
                    let mut values = Vec::new();
                    let (value, took) = self.selector(&tokens, i)?;
                    values.push(value);
                    i += took;
                    while tokens.get(i) == Some(&".") {
                        let (value, took) = self.selector(&tokens, i + 1)?;
                        values.push(value);
                        i += 1 + took;
                    }
                    // A selector of the other family never matches.
                    let Some(values) = values.into_iter().collect::<Option<Vec<String>>>() else {
                        return Ok(Step::Next);
                    };
                    let key = values.join(" . ");
                    if tokens.get(i) == Some(&"vmap") {
                        let name = tokens
                            .get(i + 1)
                            .and_then(|t| t.strip_prefix('@'))
                            .filter(|_| i + 2 == tokens.len())
                            .ok_or("vmap takes a named map, last")?;
                        let map = self
                            .table
                            .sets
                            .get(name)
                            .ok_or_else(|| format!("no map {name}"))?;
                        return Ok(match map.elements.get(&key) {
                            None => Step::Next,
                            Some(None) => return Err(format!("{name} is a set, not a map")),
                            Some(Some(verdict)) => verdict_step(verdict)?,
                        });
                    }
                    let negated = tokens.get(i) == Some(&"!=");
                    if negated {
                        i += 1;
                    }
                    let (matched, took) = self.value_matches(&tokens, i, &key)?;
                    i += took;
                    if matched == negated {
                        return Ok(Step::Next);
                    }
                }
            }
        }
        // No verdict: the rule only counted, or only matched.
        if counted.is_some() {
            *counter = counted;
        }
        Ok(Step::Next)
    }

    /// Whether `key` matches the value at `tokens[i..]`, and the tokens it took.
    fn value_matches(&self, tokens: &[&str], i: usize, key: &str) -> Result<(bool, usize), String> {
        let t = *tokens.get(i).ok_or("a match without a value")?;
        if let Some(name) = t.strip_prefix('@') {
            let set = self
                .table
                .sets
                .get(name)
                .ok_or_else(|| format!("no set {name}"))?;
            return Ok((set.elements.contains_key(key), 1));
        }
        if t == "{" {
            let end = tokens[i..]
                .iter()
                .position(|t| *t == "}")
                .ok_or("an unclosed set")?;
            let mut matched = false;
            for item in tokens[i + 1..i + end].iter().filter(|t| **t != ",") {
                matched |= atom_matches(item, key)?;
            }
            return Ok((matched, end + 1));
        }
        Ok((atom_matches(t, key)?, 1))
    }
}

/// One literal: an address or prefix, a port or port range, a protocol name, a
/// quoted interface name (`*` at its end: any name it begins).
fn atom_matches(atom: &str, key: &str) -> Result<bool, String> {
    if let Some(quoted) = atom.strip_prefix('"').and_then(|a| a.strip_suffix('"')) {
        return Ok(match quoted.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None => key == quoted,
        });
    }
    if let Ok(net) = atom.parse::<IpNetwork>() {
        let ip: IpAddr = key
            .parse()
            .map_err(|_| format!("{key:?} against the prefix {atom}"))?;
        return Ok(net.contains(ip));
    }
    if let Some((a, b)) = atom.split_once('-') {
        if let (Ok(a), Ok(b), Ok(k)) = (a.parse::<u16>(), b.parse::<u16>(), key.parse::<u16>()) {
            return Ok((a..=b).contains(&k));
        }
    }
    if atom.parse::<u16>().is_ok() || ["tcp", "udp", "sctp", "ipv6-icmp"].contains(&atom) {
        return Ok(atom == key);
    }
    Err(format!("unknown value {atom:?}"))
}

fn verdict_step(verdict: &str) -> Result<Step, String> {
    let words: Vec<&str> = verdict.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["accept"] => Step::Accept,
        ["drop"] => Step::Drop,
        ["return"] => Step::Return,
        ["jump", target] => Step::Jump(target.to_string()),
        ["goto", target] => Step::Goto(target.to_string()),
        _ => return Err(format!("unknown verdict {verdict:?}")),
    })
}

#[cfg(test)]
mod tests {
    use calyx_dataplane::firewall::nft::{RecordingNft, TableSync};
    use proptest::prelude::*;

    use super::*;
    use crate::policy::model::*;
    use crate::policy::table::{
        desired_table, HELD_COUNTER, POD_SOURCES_CHAIN, SPOOFED_COUNTER, TABLE,
    };
    use crate::policy::verdict::{verdict, Endpoint, Flow};

    const NODES: [&str; 2] = ["n1", "n2"];

    /// In these tests, a pod with this label has its veth still held.
    const HELD_LABEL: &str = "test/held";

    fn node_address(node: &str) -> IpAddr {
        match node {
            "n1" => "192.168.0.1".parse().unwrap(),
            _ => "192.168.0.2".parse().unwrap(),
        }
    }

    /// Each node's table, as the fake holds it after one sync.
    fn tables(cluster: &Cluster) -> BTreeMap<&'static str, Table> {
        NODES
            .iter()
            .map(|node| {
                let fake = RecordingNft::new();
                TableSync::new()
                    .sync(&fake, &desired_table(cluster, node), false)
                    .expect("the fake takes the transaction");
                (
                    *node,
                    fake.table(calyx_dataplane::firewall::nft::Family::Inet, TABLE)
                        .unwrap(),
                )
            })
            .collect()
    }

    /// Where an address lives: the node holding it (a pod's or its own), if any.
    fn node_of(cluster: &Cluster, ip: IpAddr) -> Option<&str> {
        if let Some(n) = NODES.iter().find(|n| node_address(n) == ip) {
            return Some(n);
        }
        cluster
            .pods
            .values()
            .find(|p| p.addresses.contains(&ip))
            .map(|p| p.node.as_str())
    }

    /// The packet across the nodes it meets: the sender's, then the receiver's.
    fn kernel_allows(
        cluster: &Cluster,
        tables: &BTreeMap<&str, Table>,
        packet: &Packet,
    ) -> Result<bool, String> {
        let mut nodes: Vec<&str> = Vec::new();
        nodes.extend(node_of(cluster, packet.src));
        nodes.extend(node_of(cluster, packet.dst));
        nodes.dedup();
        for node in nodes {
            let fate = at(cluster, &tables[node], node, packet)?;
            if fate != Fate::Passed {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn veth(pod: &Pod) -> String {
        format!("cyx-{}-{}", pod.key.namespace, pod.key.name)
    }

    fn pod_routes(cluster: &Cluster, node: &str) -> BTreeMap<IpAddr, String> {
        cluster
            .pods
            .values()
            .filter(|p| p.node == node && !p.host_network)
            .flat_map(|p| p.addresses.iter().map(move |ip| (*ip, veth(p))))
            .collect()
    }

    /// The packet at `node`, come in on `iif`.
    fn at_from(
        cluster: &Cluster,
        table: &Table,
        node: &str,
        iif: Option<&str>,
        packet: &Packet,
    ) -> Result<Fate, String> {
        let local = [node_address(node)];
        let routes = pod_routes(cluster, node);
        let held = cluster
            .pods
            .values()
            .filter(|p| p.labels.contains_key(HELD_LABEL))
            .map(veth)
            .collect();
        let view = Node {
            local: &local,
            pod_routes: &routes,
            held: &held,
        };
        traverse(table, &view, iif, packet)
    }

    /// The packet at `node`: come in on the source pod's veth when the source is a
    /// pod there, sent by the node when it is the node's, else come in by the overlay.
    fn at(cluster: &Cluster, table: &Table, node: &str, packet: &Packet) -> Result<Fate, String> {
        let iif = if packet.src == node_address(node) {
            None
        } else {
            Some(
                pod_routes(cluster, node)
                    .remove(&packet.src)
                    .unwrap_or_else(|| "vxlan.calyx".into()),
            )
        };
        at_from(cluster, table, node, iif.as_deref(), packet)
    }

    /// A local pod sending from any address but its own is dropped at its veth.
    fn check_spoofing(
        cluster: &Cluster,
        tables: &BTreeMap<&str, Table>,
        addresses: &[IpAddr],
    ) -> Result<(), String> {
        for pod in cluster.pods.values().filter(|p| !p.host_network) {
            for &src in addresses.iter().filter(|a| !pod.addresses.contains(a)) {
                let dst = *addresses
                    .iter()
                    .find(|d| d.is_ipv4() == src.is_ipv4())
                    .unwrap();
                let packet = Packet {
                    src,
                    dst,
                    protocol: Protocol::Udp,
                    port: 80,
                    established: false,
                };
                let fate = at_from(
                    cluster,
                    &tables[pod.node.as_str()],
                    &pod.node,
                    Some(&veth(pod)),
                    &packet,
                )?;
                let spoofed = Fate::Dropped {
                    chain: POD_SOURCES_CHAIN.into(),
                    counter: Some(SPOOFED_COUNTER.into()),
                };
                if fate != spoofed {
                    return Err(format!("{} sending as {src}: {fate:?}", pod.key));
                }
            }
        }
        Ok(())
    }

    fn endpoint(cluster: &Cluster, ip: IpAddr) -> Endpoint<'_> {
        if let Some(n) = NODES.iter().find(|n| node_address(n) == ip) {
            return Endpoint {
                address: ip,
                pod: None,
                node: Some(n),
            };
        }
        match cluster.pods.values().find(|p| p.addresses.contains(&ip)) {
            Some(pod) => Endpoint::pod(pod, ip),
            None => Endpoint::address(ip),
        }
    }

    /// Every flow between every address the test knows, on its ports, both ways.
    fn check_every_flow(cluster: &Cluster) -> Result<(), String> {
        let tables = tables(cluster);
        let mut addresses: Vec<IpAddr> = cluster
            .pods
            .values()
            .flat_map(|p| p.addresses.clone())
            .collect();
        addresses.extend(NODES.iter().map(|n| node_address(n)));
        addresses.push("203.0.113.7".parse().unwrap());
        addresses.push("2001:db8::7".parse().unwrap());
        check_spoofing(cluster, &tables, &addresses)?;
        for &src in &addresses {
            for &dst in &addresses {
                if src.is_ipv4() != dst.is_ipv4() {
                    continue;
                }
                let from = endpoint(cluster, src);
                let to = endpoint(cluster, dst);
                // Outside to outside, or a node to itself, never meets a pod's rules.
                if from.pod.is_none() && to.pod.is_none() {
                    continue;
                }
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    for port in [80, 81, 82] {
                        let flow = Flow {
                            from,
                            to,
                            protocol,
                            port,
                        };
                        let want = verdict(cluster, &flow);
                        let packet = Packet {
                            src,
                            dst,
                            protocol,
                            port,
                            established: false,
                        };
                        let got = kernel_allows(cluster, &tables, &packet)?;
                        if got != want.is_allowed() {
                            return Err(format!(
                                "{src} -> {dst} {}/{port}: the kernel {} it, the model says {want:?}",
                                protocol.name(),
                                if got { "allows" } else { "denies" }
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(ns: &str, name: &str, node: &str, addresses: &[&str], port_80: u16) -> Pod {
        Pod {
            key: PodKey {
                namespace: ns.into(),
                name: name.into(),
            },
            labels: labels(&[("pod", name)]),
            node: node.into(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            named_ports: vec![NamedPort {
                name: "serve".into(),
                protocol: Protocol::Tcp,
                port: port_80,
            }],
            host_network: false,
        }
    }

    fn small_cluster() -> Cluster {
        let mut c = Cluster::default();
        for ns in ["x", "y"] {
            c.namespaces.insert(
                ns.into(),
                Namespace {
                    name: ns.into(),
                    labels: labels(&[(NAMESPACE_NAME_LABEL, ns), ("ns", ns)]),
                },
            );
        }
        for p in [
            pod("x", "a", "n1", &["10.244.1.1", "fd00::1:1"], 80),
            pod("x", "b", "n2", &["10.244.2.1", "fd00::2:1"], 81),
            pod("y", "a", "n1", &["10.244.1.2"], 80),
            pod("y", "b", "n2", &["10.244.2.2", "fd00::2:2"], 80),
        ] {
            c.pods.insert(p.key.clone(), p);
        }
        c
    }

    fn policy(ns: &str, name: &str, selector: Selector) -> Policy {
        Policy {
            key: PolicyKey {
                namespace: ns.into(),
                name: name.into(),
            },
            pod_selector: selector,
            ingress: None,
            egress: None,
        }
    }

    fn select(pairs: &[(&str, &str)]) -> Selector {
        Selector {
            match_labels: labels(pairs),
            match_expressions: Vec::new(),
        }
    }

    #[test]
    fn without_policies_everything_passes_and_the_table_dispatches_nothing() {
        let c = small_cluster();
        let t = desired_table(&c, "n1");
        assert_eq!(t.sets["ingress-v4"].elements.len(), 0);
        assert_eq!(t.sets["egress-v4"].elements.len(), 0);
        check_every_flow(&c).unwrap();
    }

    #[test]
    fn a_default_deny_drops_new_packets_counts_them_and_lets_replies_through() {
        let mut c = small_cluster();
        let mut deny = policy("x", "deny", Selector::everything());
        deny.ingress = Some(Vec::new());
        c.policies.insert(deny.key.clone(), deny);
        check_every_flow(&c).unwrap();
        let tables = tables(&c);
        let packet = Packet {
            src: "10.244.2.2".parse().unwrap(),
            dst: "10.244.1.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
            established: false,
        };
        let fate = at(&c, &tables["n1"], "n1", &packet).unwrap();
        let Fate::Dropped { counter, .. } = fate else {
            panic!("{fate:?}")
        };
        assert_eq!(counter.as_deref(), Some("denied/x/ingress"));
        let reply = Packet {
            established: true,
            ..packet
        };
        assert_eq!(at(&c, &tables["n1"], "n1", &reply).unwrap(), Fate::Passed);
        // The node reaches its own pods.
        let probe = Packet {
            src: node_address("n1"),
            established: false,
            ..reply
        };
        assert_eq!(at(&c, &tables["n1"], "n1", &probe).unwrap(), Fate::Passed);
    }

    #[test]
    fn an_allowing_rule_counts_in_its_policy_counter() {
        let mut c = small_cluster();
        let mut allow = policy("x", "allow-web", select(&[("pod", "a")]));
        allow.ingress = Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespaces: Some(Selector::everything()),
                pods: select(&[("pod", "b")]),
            }],
            ports: vec![PortRule {
                protocol: Protocol::Tcp,
                port: PortSpec::Named("serve".into()),
            }],
        }]);
        c.policies.insert(allow.key.clone(), allow);
        check_every_flow(&c).unwrap();
        let t = &tables(&c)["n1"];
        let rules = &t.chains["policy/x/allow-web/ingress"].rules;
        assert!(rules
            .iter()
            .all(|r| r.contains("counter name allowed/x/allow-web/ingress")));
    }

    #[test]
    fn a_pod_sends_from_its_link_local_address_and_only_its_own_others() {
        let c = small_cluster();
        let t = &tables(&c)["n1"];
        let xa = &c.pods[&PodKey {
            namespace: "x".into(),
            name: "a".into(),
        }];
        let from = |src: &str| Packet {
            src: src.parse().unwrap(),
            dst: "fd00::2:1".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 80,
            established: false,
        };
        // Neighbour discovery is link-local, never forwarded.
        let fate = at_from(&c, t, "n1", Some(&veth(xa)), &from("fe80::1")).unwrap();
        assert_eq!(fate, Fate::Passed);
        let fate = at_from(&c, t, "n1", Some(&veth(xa)), &from("fd00::1:1")).unwrap();
        assert_eq!(fate, Fate::Passed);
        // y/a's address from x/a's veth.
        let mut spoofed = from("10.244.1.2");
        spoofed.dst = "10.244.2.1".parse().unwrap();
        let fate = at_from(&c, t, "n1", Some(&veth(xa)), &spoofed).unwrap();
        assert!(
            matches!(fate, Fate::Dropped { counter: Some(ref c), .. } if c == SPOOFED_COUNTER),
            "{fate:?}"
        );
    }

    #[test]
    fn a_held_pod_hears_only_its_node_and_sends_only_replies() {
        let mut c = small_cluster();
        let xa = PodKey {
            namespace: "x".into(),
            name: "a".into(),
        };
        c.pods
            .get_mut(&xa)
            .unwrap()
            .labels
            .insert(HELD_LABEL.into(), "yes".into());
        let t = &tables(&c)["n1"];
        let packet = |src: &str, dst: &str, established: bool| Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
            established,
        };
        let held = |fate: Fate| matches!(fate, Fate::Dropped { counter: Some(ref c), .. } if c == HELD_COUNTER);
        // y/a (same node) and x/b (the other node, come in by the overlay) to x/a.
        assert!(held(
            at(&c, t, "n1", &packet("10.244.1.2", "10.244.1.1", false)).unwrap()
        ));
        assert!(held(
            at(&c, t, "n1", &packet("10.244.2.1", "10.244.1.1", false)).unwrap()
        ));
        // x/a to anyone, its node included.
        assert!(held(
            at(&c, t, "n1", &packet("10.244.1.1", "10.244.2.1", false)).unwrap()
        ));
        assert!(held(
            at(&c, t, "n1", &packet("10.244.1.1", "192.168.0.1", false)).unwrap()
        ));
        // Its node's probes, and their replies.
        let probe = packet("192.168.0.1", "10.244.1.1", false);
        assert_eq!(at(&c, t, "n1", &probe).unwrap(), Fate::Passed);
        let reply = packet("10.244.1.1", "192.168.0.1", true);
        assert_eq!(at(&c, t, "n1", &reply).unwrap(), Fate::Passed);
        // Without the label, y/a reaches it (no policies).
        c.pods.get_mut(&xa).unwrap().labels.remove(HELD_LABEL);
        let t = &tables(&c)["n1"];
        assert_eq!(
            at(&c, t, "n1", &packet("10.244.1.2", "10.244.1.1", false)).unwrap(),
            Fate::Passed
        );
    }

    #[test]
    fn a_rule_the_tracer_does_not_know_is_an_error() {
        let mut t = desired_table(&small_cluster(), "n1");
        t.chains
            .get_mut("egress")
            .unwrap()
            .rules
            .insert(0, "meta mark 0x1 drop".into());
        let packet = Packet {
            src: "10.244.1.1".parse().unwrap(),
            dst: "10.244.2.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
            established: false,
        };
        let err = at(&small_cluster(), &t, "n1", &packet).unwrap_err();
        assert!(err.contains("meta"), "{err}");
    }

    // The generator: cyclonus's vocabulary, small enough to hit every combination.
    const KEYS: [&str; 2] = ["pod", "app"];
    const VALUES: [&str; 3] = ["a", "b", "c"];

    fn labels_strategy() -> impl Strategy<Value = Labels> {
        proptest::collection::btree_map(
            proptest::sample::select(KEYS.to_vec()).prop_map(String::from),
            proptest::sample::select(VALUES.to_vec()).prop_map(String::from),
            0..=2,
        )
    }

    fn selector_strategy() -> impl Strategy<Value = Selector> {
        let requirement = (
            proptest::sample::select(KEYS.to_vec()),
            proptest::sample::select(vec![
                Operator::In,
                Operator::NotIn,
                Operator::Exists,
                Operator::DoesNotExist,
            ]),
            proptest::collection::btree_set(
                proptest::sample::select(VALUES.to_vec()).prop_map(String::from),
                1..=2,
            ),
        )
            .prop_map(|(key, operator, values)| Requirement {
                key: key.to_string(),
                operator,
                values: match operator {
                    Operator::In | Operator::NotIn => values,
                    _ => Default::default(),
                },
            });
        (
            labels_strategy(),
            proptest::collection::vec(requirement, 0..=1),
        )
            .prop_map(|(match_labels, match_expressions)| Selector {
                match_labels,
                match_expressions,
            })
    }

    fn peer_strategy() -> impl Strategy<Value = Peer> {
        prop_oneof![
            (
                proptest::option::of(selector_strategy()),
                selector_strategy()
            )
                .prop_map(|(namespaces, pods)| Peer::Pods { namespaces, pods }),
            // Blocks over the pods' range, with a hole; and one v6 block.
            (0u8..4, proptest::bool::ANY).prop_map(|(n, hole)| Peer::Block {
                cidr: format!("10.244.{n}.0/24").parse().unwrap(),
                except: if hole {
                    vec![format!("10.244.{n}.2/32").parse().unwrap()]
                } else {
                    Vec::new()
                },
            }),
            Just(Peer::Block {
                cidr: "fd00::/16".parse().unwrap(),
                except: vec!["fd00::2:0/112".parse().unwrap()],
            }),
            Just(Peer::Block {
                cidr: "0.0.0.0/0".parse().unwrap(),
                except: vec!["10.244.0.0/16".parse().unwrap()],
            }),
        ]
    }

    fn port_strategy() -> impl Strategy<Value = PortRule> {
        let protocol = proptest::sample::select(vec![Protocol::Tcp, Protocol::Udp]);
        let port = prop_oneof![
            Just(PortSpec::Any),
            Just(PortSpec::Range { port: 80, end: 80 }),
            Just(PortSpec::Range { port: 81, end: 82 }),
            Just(PortSpec::Named("serve".into())),
            Just(PortSpec::Named("dns".into())),
        ];
        (protocol, port).prop_map(|(protocol, port)| PortRule { protocol, port })
    }

    fn rules_strategy() -> impl Strategy<Value = Option<Vec<Rule>>> {
        let rule = (
            proptest::collection::vec(peer_strategy(), 0..=2),
            proptest::collection::vec(port_strategy(), 0..=2),
        )
            .prop_map(|(peers, ports)| Rule { peers, ports });
        proptest::option::of(proptest::collection::vec(rule, 0..=2))
    }

    prop_compose! {
        fn cluster_strategy()(
            ns_labels in proptest::collection::vec(labels_strategy(), 3),
            pods in proptest::collection::vec(
                (0usize..3, labels_strategy(), 0usize..2, proptest::bool::ANY, 80u16..82, proptest::bool::weighted(0.1)),
                1..=7,
            ),
            policies in proptest::collection::vec(
                (0usize..3, selector_strategy(), rules_strategy(), rules_strategy()),
                0..=4,
            ),
        ) -> Cluster {
            let mut c = Cluster::default();
            let names = ["x", "y", "z"];
            for (ns, mut labels) in names.iter().zip(ns_labels) {
                labels.insert(NAMESPACE_NAME_LABEL.into(), ns.to_string());
                c.namespaces.insert(ns.to_string(), Namespace { name: ns.to_string(), labels });
            }
            for (i, (ns, labels, node, v6, port, host_network)) in pods.into_iter().enumerate() {
                let key = PodKey { namespace: names[ns].into(), name: format!("p{i}") };
                let node = NODES[node];
                let mut addresses: Vec<IpAddr> = if host_network {
                    vec![node_address(node)]
                } else {
                    vec![format!("10.244.{}.{}", i % 4, i + 1).parse().unwrap()]
                };
                if v6 && !host_network {
                    addresses.push(format!("fd00::{}:{}", i % 4, i + 1).parse().unwrap());
                }
                c.pods.insert(key.clone(), Pod {
                    key,
                    labels,
                    node: node.into(),
                    addresses,
                    named_ports: vec![
                        NamedPort { name: "serve".into(), protocol: Protocol::Tcp, port },
                        NamedPort { name: "dns".into(), protocol: Protocol::Udp, port: 82 },
                    ],
                    host_network,
                });
            }
            for (i, (ns, pod_selector, ingress, egress)) in policies.into_iter().enumerate() {
                let key = PolicyKey { namespace: names[ns].into(), name: format!("np{i}") };
                // As the API defaults policyTypes: ingress always.
                let ingress = ingress.or(Some(Vec::new())).filter(|_| i % 3 != 2 || egress.is_none());
                c.policies.insert(key.clone(), Policy { key, pod_selector, ingress, egress });
            }
            c
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// A change's table, patched from the last build, is the table built afresh:
        /// pods come, go and change between two clusters of the same namespaces.
        #[test]
        fn a_patched_build_is_the_fresh_build(
            before in cluster_strategy(),
            after in cluster_strategy(),
            keep in proptest::collection::vec(proptest::bool::ANY, 8),
        ) {
            let mut after = after;
            after.namespaces = before.namespaces.clone();
            // Mostly the same policies (pods alone changed), sometimes others too.
            if keep[0] || keep[1] {
                after.policies = before.policies.clone();
            }
            // Some pods stay as they were, the rest are the other cluster's.
            for (i, (key, pod)) in before.pods.iter().enumerate() {
                if keep[i % keep.len()] && !after.pods.values().any(|p| p.key != *key && p.addresses.iter().any(|a| pod.addresses.contains(a))) {
                    after.pods.insert(key.clone(), pod.clone());
                }
            }
            for node in NODES {
                let previous = crate::policy::table::build(&before, node, None);
                let patched = crate::policy::table::build(&after, node, Some(&previous));
                let fresh = desired_table(&after, node);
                prop_assert_eq!(&patched.table, &fresh);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
        #[test]
        fn the_kernel_table_judges_every_flow_as_the_model_does(cluster in cluster_strategy()) {
            if let Err(e) = check_every_flow(&cluster) {
                return Err(TestCaseError::fail(format!("{e}\n{cluster:#?}")));
            }
        }
    }
}
