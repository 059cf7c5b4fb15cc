//! A packet tracer over the nftables mode's table (as a recording fake holds it after
//! any number of syncs), as kube-proxy's nftables tests have one: it runs a new
//! connection's first packet through every base chain in hook and priority order and
//! interprets each rule it meets (matches, set and map lookups, jumps, gotos, DNAT,
//! marks, masquerade, reject), following every branch a `numgen` can take. A rule it
//! does not understand fails the test, so a broken rule anywhere in the path cannot
//! pass unnoticed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use calyx_dataplane::firewall::nft::Table;
use ipnetwork::IpNetwork;

use crate::proxy::model::Protocol;

/// Where a packet comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Arrives on this interface (a pod's `cyx...` veth, the underlay's `eth0`).
    Interface(String),
    /// Sent by the node itself (output hook).
    Node,
}

#[derive(Debug, Clone)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// endpoint -> masqueraded
    Dnat(BTreeMap<SocketAddr, bool>),
    Reject,
    Drop,
    /// Not a Service packet: the table leaves it alone.
    Untouched,
}

/// The packet as the rules see it, along one branch.
#[derive(Debug, Clone)]
struct Flow {
    dst: IpAddr,
    port: u16,
    dnat: Option<SocketAddr>,
    mark: u32,
    masquerade: bool,
    /// Elements added by `update` to dynamic sets.
    learned: BTreeMap<String, BTreeSet<String>>,
}

/// How a rule (or a chain) ends for one branch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// The rule did not match, or only changed the packet: the next rule.
    Next,
    Jump(String),
    Goto(String),
    Return,
    Accept,
    Drop,
    Reject,
}

/// What a selector reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Daddr,
    Saddr,
    L4proto,
    Dport,
    Mark,
    /// `numgen random mod N`: every value is one branch.
    Numgen(usize),
}

struct Tracer<'t> {
    table: &'t Table,
    packet: &'t Packet,
    local: &'t [IpAddr],
}

fn family_word(table: &Table) -> &'static str {
    table.family.keyword()
}

/// Whether a set element's key matches `key`: component by component, a component
/// that is a prefix (interval sets) contains the packet's value.
fn element_matches(element: &str, key: &str) -> bool {
    let (e, k): (Vec<&str>, Vec<&str>) =
        (element.split(" . ").collect(), key.split(" . ").collect());
    e.len() == k.len()
        && e.iter().zip(&k).all(|(e, k)| {
            e == k
                || match (e.parse::<IpNetwork>(), k.parse::<IpAddr>()) {
                    (Ok(net), Ok(ip)) => net.contains(ip),
                    _ => false,
                }
        })
}

fn parse_endpoint(value: &str) -> SocketAddr {
    let (ip, port) = value.split_once(" . ").expect("ip . port");
    SocketAddr::new(ip.parse().expect("ip"), port.parse().expect("port"))
}

impl Tracer<'_> {
    fn fail(&self, rule: &str, why: &str) -> ! {
        panic!("the tracer does not understand rule `{rule}`: {why}")
    }

    /// The elements of a set or map with their values (a dynamic set's learned ones
    /// included).
    fn elements(&self, flow: &Flow, set: &str, rule: &str) -> Vec<(String, Option<String>)> {
        let Some(held) = self.table.sets.get(set) else {
            self.fail(rule, &format!("no set {set}"));
        };
        let mut out: Vec<(String, Option<String>)> = held
            .elements
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.extend(
            flow.learned
                .get(set)
                .into_iter()
                .flatten()
                .map(|k| (k.clone(), None)),
        );
        out
    }

    fn value(&self, flow: &Flow, selector: &Selector, branch: usize) -> String {
        match selector {
            Selector::Daddr => flow.dst.to_string(),
            Selector::Saddr => self.packet.src.to_string(),
            Selector::L4proto => self.packet.protocol.name().to_string(),
            Selector::Dport => flow.port.to_string(),
            Selector::Mark => format!("{:#x}", flow.mark),
            Selector::Numgen(_) => branch.to_string(),
        }
    }

    /// The key a concatenation of selectors makes, per branch (one unless a numgen is
    /// in it).
    fn keys(&self, flow: &Flow, selectors: &[Selector]) -> Vec<String> {
        let branches = selectors
            .iter()
            .find_map(|s| match s {
                Selector::Numgen(n) => Some(*n),
                _ => None,
            })
            .unwrap_or(1);
        (0..branches)
            .map(|b| {
                selectors
                    .iter()
                    .map(|s| self.value(flow, s, b))
                    .collect::<Vec<_>>()
                    .join(" . ")
            })
            .collect()
    }

    /// Reads `sel (. sel)*` at `words[*at..]`.
    fn selectors(&self, words: &[&str], at: &mut usize, rule: &str) -> Vec<Selector> {
        let ip = family_word(self.table);
        let mut out = Vec::new();
        loop {
            let one = match (words.get(*at).copied(), words.get(*at + 1).copied()) {
                (Some(w), Some("daddr")) if w == ip => Selector::Daddr,
                (Some(w), Some("saddr")) if w == ip => Selector::Saddr,
                (Some("meta"), Some("l4proto")) => Selector::L4proto,
                (Some("meta"), Some("mark")) => Selector::Mark,
                (Some("th"), Some("dport")) => Selector::Dport,
                (Some("numgen"), Some("random")) => {
                    let n = match (words.get(*at + 2), words.get(*at + 3)) {
                        (Some(&"mod"), Some(n)) => n
                            .parse()
                            .unwrap_or_else(|_| self.fail(rule, "numgen modulus")),
                        _ => self.fail(rule, "numgen without mod"),
                    };
                    *at += 2;
                    Selector::Numgen(n)
                }
                _ => break,
            };
            *at += 2;
            out.push(one);
            if words.get(*at) == Some(&".") {
                *at += 1;
            } else {
                break;
            }
        }
        out
    }

    /// A verdict written in a map's value or after a rule's matches.
    fn verdict(&self, text: &str, rule: &str) -> Step {
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["jump", chain] => Step::Jump(chain.to_string()),
            ["goto", chain] => Step::Goto(chain.to_string()),
            ["drop"] => Step::Drop,
            ["accept"] => Step::Accept,
            ["return"] => Step::Return,
            _ => self.fail(rule, &format!("verdict `{text}`")),
        }
    }

    /// Runs one rule on `flow`: every branch's flow and step.
    fn rule(&self, rule: &str, flow: Flow) -> Vec<(Flow, Step)> {
        let words: Vec<&str> = rule.split_whitespace().collect();
        let mut flow = flow;
        let mut at = 0;
        let no = |flow: Flow| vec![(flow, Step::Next)];
        while at < words.len() {
            let start = at;
            let selectors = self.selectors(&words, &mut at, rule);
            if !selectors.is_empty() {
                let keys = self.keys(&flow, &selectors);
                match words.get(at).copied() {
                    Some(set) if set.starts_with('@') => {
                        let elements = self.elements(&flow, &set[1..], rule);
                        at += 1;
                        if !keys
                            .iter()
                            .all(|k| elements.iter().any(|(e, _)| element_matches(e, k)))
                        {
                            return no(flow);
                        }
                    }
                    Some("!=") => {
                        let what = words
                            .get(at + 1)
                            .copied()
                            .unwrap_or_else(|| self.fail(rule, "!= what"));
                        at += 2;
                        let hit = if let Some(set) = what.strip_prefix('@') {
                            let elements = self.elements(&flow, set, rule);
                            keys.iter()
                                .any(|k| elements.iter().any(|(e, _)| element_matches(e, k)))
                        } else {
                            keys.iter().any(|k| element_matches(what, k))
                        };
                        if hit {
                            return no(flow);
                        }
                    }
                    Some("vmap") => {
                        let target = words.get(at + 1).copied().unwrap_or_default();
                        if let Some(map) = target.strip_prefix('@') {
                            let elements = self.elements(&flow, map, rule);
                            let key = &keys[0];
                            return match elements.iter().find(|(e, _)| element_matches(e, key)) {
                                Some((_, Some(v))) => vec![(flow.clone(), self.verdict(v, rule))],
                                Some((_, None)) => {
                                    self.fail(rule, "a vmap element without a verdict")
                                }
                                None => no(flow),
                            };
                        }
                        // An inline vmap: `{ 0 : goto a, 1 : goto b }`.
                        let inline = words[at + 1..].join(" ");
                        let inline = inline.trim().trim_start_matches('{').trim_end_matches('}');
                        let arms: BTreeMap<String, String> = inline
                            .split(',')
                            .filter_map(|arm| arm.split_once(':'))
                            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                            .collect();
                        return keys
                            .iter()
                            .map(|k| match arms.get(k) {
                                Some(v) => (flow.clone(), self.verdict(v, rule)),
                                None => (flow.clone(), Step::Next),
                            })
                            .collect();
                    }
                    Some("&") if selectors == [Selector::Mark] => {
                        // meta mark & MASK == VALUE
                        let (mask, op, value) =
                            (words.get(at + 1), words.get(at + 2), words.get(at + 3));
                        let parse = |w: Option<&&str>| {
                            w.and_then(|w| {
                                u32::from_str_radix(
                                    w.trim_start_matches("0x"),
                                    if w.starts_with("0x") { 16 } else { 10 },
                                )
                                .ok()
                            })
                            .unwrap_or_else(|| self.fail(rule, "a mark number"))
                        };
                        if op != Some(&"==") {
                            self.fail(rule, "mark test");
                        }
                        at += 4;
                        if flow.mark & parse(mask) != parse(value) {
                            return no(flow);
                        }
                    }
                    Some("set") if selectors == [Selector::Mark] => {
                        // meta mark set meta mark | BIT   (or ^ BIT)
                        match (words.get(at + 1..at + 5), words.get(at + 5)) {
                            (Some(["meta", "mark", op, bit]), None) => {
                                let bit = u32::from_str_radix(bit.trim_start_matches("0x"), 16)
                                    .unwrap_or_else(|_| self.fail(rule, "mark bit"));
                                match *op {
                                    "|" => flow.mark |= bit,
                                    "^" => flow.mark ^= bit,
                                    _ => self.fail(rule, "mark operator"),
                                }
                            }
                            _ => self.fail(rule, "mark statement"),
                        }
                        return no(flow);
                    }
                    Some(literal) if !literal.is_empty() => {
                        at += 1;
                        if !keys.iter().all(|k| element_matches(literal, k)) {
                            return no(flow);
                        }
                    }
                    _ => self.fail(rule, "a selector without a test"),
                }
                continue;
            }
            at = start;
            match words[at] {
                "iifname" => {
                    let iif = match &self.packet.origin {
                        Origin::Interface(name) => name.as_str(),
                        Origin::Node => "",
                    };
                    let (negated, pattern) = match words.get(at + 1) {
                        Some(&"!=") => (true, words.get(at + 2)),
                        other => (false, other),
                    };
                    let pattern = pattern
                        .unwrap_or_else(|| self.fail(rule, "iifname what"))
                        .trim_matches('"');
                    at += if negated { 3 } else { 2 };
                    let hit = match pattern.strip_suffix('*') {
                        Some(prefix) => iif.starts_with(prefix),
                        None => iif == pattern,
                    };
                    if hit == negated {
                        return no(flow);
                    }
                }
                "fib" => {
                    if words.get(at + 1..at + 4) != Some(&["daddr", "type", "local"][..]) {
                        self.fail(rule, "fib test");
                    }
                    at += 4;
                    if !self.local.contains(&flow.dst) && !flow.dst.is_loopback() {
                        return no(flow);
                    }
                }
                "ct" => {
                    match words.get(at + 1..at + 3) {
                        // The tracer follows a new connection's first packet.
                        Some(["state", "new"]) => {}
                        Some(["status", "dnat"]) => {
                            if flow.dnat.is_none() {
                                return no(flow);
                            }
                        }
                        _ => self.fail(rule, "ct test"),
                    }
                    at += 3;
                }
                "update" => {
                    let set = words
                        .get(at + 1)
                        .and_then(|w| w.strip_prefix('@'))
                        .unwrap_or_else(|| self.fail(rule, "update what"));
                    let mut inner = at + 3; // past "@set {"
                    let selectors = self.selectors(&words, &mut inner, rule);
                    if words.get(at + 2) != Some(&"{") || words.get(inner) != Some(&"}") {
                        self.fail(rule, "update syntax");
                    }
                    for key in self.keys(&flow, &selectors) {
                        flow.learned.entry(set.to_string()).or_default().insert(key);
                    }
                    at = inner + 1;
                }
                "dnat" => {
                    let ip = family_word(self.table);
                    if words.get(at + 1) != Some(&ip) || words.get(at + 2) != Some(&"to") {
                        self.fail(rule, "dnat syntax");
                    }
                    let mut to = at + 3;
                    let selectors = self.selectors(&words, &mut to, rule);
                    let targets: Vec<SocketAddr> = if selectors.is_empty() {
                        let literal = words
                            .get(to)
                            .unwrap_or_else(|| self.fail(rule, "dnat to what"));
                        vec![literal
                            .parse()
                            .unwrap_or_else(|_| self.fail(rule, "dnat address"))]
                    } else {
                        let map = match (words.get(to), words.get(to + 1)) {
                            (Some(&"map"), Some(m)) => m
                                .strip_prefix('@')
                                .unwrap_or_else(|| self.fail(rule, "map name")),
                            _ => self.fail(rule, "dnat map"),
                        };
                        let elements = self.elements(&flow, map, rule);
                        self.keys(&flow, &selectors)
                            .iter()
                            .map(|k| {
                                let value = elements
                                    .iter()
                                    .find(|(e, _)| element_matches(e, k))
                                    .and_then(|(_, v)| v.clone())
                                    .unwrap_or_else(|| panic!("rule `{rule}`: no endpoint in {map} for {k}: every slot must be filled"));
                                parse_endpoint(&value)
                            })
                            .collect()
                    };
                    return targets
                        .into_iter()
                        .map(|to| {
                            let mut f = flow.clone();
                            f.dst = to.ip();
                            f.port = to.port();
                            f.dnat = Some(to);
                            (f, Step::Accept)
                        })
                        .collect();
                }
                "masquerade" => {
                    flow.masquerade = true;
                    return vec![(flow, Step::Accept)];
                }
                "reject" => return vec![(flow, Step::Reject)],
                "jump" | "goto" | "drop" | "accept" | "return" => {
                    let step = self.verdict(&words[at..].join(" "), rule);
                    return vec![(flow, step)];
                }
                other => self.fail(rule, &format!("`{other}`")),
            }
        }
        no(flow)
    }

    /// Runs `chain` from rule `from` on: every branch's flow and how the chain ended
    /// (Return: it fell off its end or returned).
    fn run(&self, chain: &str, from: usize, flow: Flow) -> Vec<(Flow, Step)> {
        let Some(rules) = self.table.chains.get(chain).map(|c| &c.rules) else {
            panic!("a jump or goto to chain {chain}, which the table does not have");
        };
        let Some(rule) = rules.get(from) else {
            return vec![(flow, Step::Return)];
        };
        let mut out = Vec::new();
        for (flow, step) in self.rule(rule, flow) {
            match step {
                Step::Next => out.extend(self.run(chain, from + 1, flow)),
                Step::Jump(target) => {
                    for (flow, end) in self.run(&target, 0, flow) {
                        match end {
                            Step::Return => out.extend(self.run(chain, from + 1, flow)),
                            end => out.push((flow, end)),
                        }
                    }
                }
                // A goto's chain ends this one too.
                Step::Goto(target) => out.extend(self.run(&target, 0, flow)),
                end => out.push((flow, end)),
            }
        }
        out
    }

    /// Every base chain of `hook`, by priority, on each branch; a branch that is
    /// dropped or rejected stops there.
    fn hook(&self, hook: &str, flows: Vec<(Flow, Step)>) -> Vec<(Flow, Step)> {
        let mut flows = flows;
        for chain in self.table.base_chains(hook) {
            flows = flows
                .into_iter()
                .flat_map(|(flow, state)| match state {
                    Step::Drop | Step::Reject => vec![(flow, state)],
                    _ => self
                        .run(chain, 0, flow)
                        .into_iter()
                        .map(|(f, end)| match end {
                            Step::Return | Step::Accept => (f, Step::Accept),
                            end => (f, end),
                        })
                        .collect(),
                })
                .collect();
        }
        flows
    }
}

/// Where `packet`, arriving at (or sent from) a node whose local addresses are
/// `local`, goes: the base chains of each hook on its path, every rule interpreted.
pub fn trace(table: &Table, packet: &Packet, local: &[IpAddr]) -> Outcome {
    let tracer = Tracer {
        table,
        packet,
        local,
    };
    let start = Flow {
        dst: packet.dst,
        port: packet.port,
        dnat: None,
        mark: 0,
        masquerade: false,
        learned: BTreeMap::new(),
    };
    let mut flows = vec![(start, Step::Accept)];
    let is_local = |f: &Flow| local.contains(&f.dst) || f.dst.is_loopback();
    match packet.origin {
        Origin::Node => flows = tracer.hook("output", flows),
        Origin::Interface(_) => {
            flows = tracer.hook("prerouting", flows);
            // The routing decision, on the address after DNAT.
            let (to_us, through): (Vec<_>, Vec<_>) =
                flows.into_iter().partition(|(f, _)| is_local(f));
            flows = tracer.hook("input", to_us);
            let forwarded = tracer.hook("forward", through);
            flows.extend(forwarded);
        }
    }
    let (delivered, leaving): (Vec<_>, Vec<_>) = flows
        .into_iter()
        .partition(|(f, _)| packet.origin != Origin::Node && is_local(f));
    let mut flows = delivered;
    flows.extend(tracer.hook("postrouting", leaving));
    let ends: BTreeSet<String> = flows
        .iter()
        .map(|(f, step)| match (step, f.dnat) {
            (Step::Drop, _) => "drop".to_string(),
            (Step::Reject, _) => "reject".to_string(),
            (_, Some(_)) => "dnat".to_string(),
            (_, None) => "untouched".to_string(),
        })
        .collect();
    match ends
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["dnat"] => Outcome::Dnat(
            flows
                .into_iter()
                .filter_map(|(f, _)| f.dnat.map(|to| (to, f.masquerade)))
                .collect(),
        ),
        ["drop"] => Outcome::Drop,
        ["reject"] => Outcome::Reject,
        ["untouched"] => Outcome::Untouched,
        mixed => panic!("branches end differently: {mixed:?}: {flows:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::{port_plans, ProxyState, ServicePort};
    use crate::proxy::nftables::table::{desired_table, TABLE};
    use crate::proxy::node::NodeSettings;
    use crate::proxy::testing::{endpoint, key, service, slice, slice_mut, state};
    use calyx_dataplane::firewall::nft::{RecordingNft, TableSync};
    use calyx_dataplane::firewall::IpFamily;

    const NODE1: &str = "192.0.2.11";
    const POD1: &str = "10.244.1.2";
    const POD2: &str = "10.244.2.2";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cluster() -> ProxyState {
        let mut web = service("web", "10.96.0.10", 80);
        web.ports[0].node_port = Some(30080);
        let none = service("none", "10.96.0.11", 80);
        let mut local = service("local", "10.96.0.12", 80);
        local.ports[0].node_port = Some(30081);
        local.external_local = true;
        let mut sticky = service("sticky", "10.96.0.13", 80);
        sticky.affinity_seconds = Some(60);
        let mut lb = service("lb", "10.96.0.14", 80);
        lb.load_balancer_ips = vec![ip("203.0.113.7")];
        lb.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let mut dual = service("dual", "10.96.0.15", 80);
        dual.cluster_ips.push(ip("fd00:96::15"));
        dual.ports.push(ServicePort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            port: 53,
            node_port: None,
        });
        let mut dual_slice = slice(
            "dual",
            8080,
            vec![endpoint(POD1, "n1"), endpoint("fd00:10:244:1::2", "n1")],
        );
        dual_slice.ports.push(crate::proxy::model::SlicePort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            port: 5353,
        });
        state(
            vec![web, none, local, sticky, lb, dual],
            vec![
                slice(
                    "web",
                    8080,
                    vec![endpoint(POD1, "n1"), endpoint(POD2, "n2")],
                ),
                slice("local", 8080, vec![endpoint(POD2, "n2")]),
                slice(
                    "sticky",
                    8080,
                    vec![endpoint(POD1, "n1"), endpoint(POD2, "n2")],
                ),
                slice("lb", 8080, vec![endpoint(POD2, "n2")]),
                dual_slice,
            ],
        )
    }

    fn ctx() -> NodeSettings {
        NodeSettings {
            nodeport_addresses: vec![format!("{NODE1}/32").parse().unwrap()],
        }
    }

    fn synced(st: &ProxyState, node: &str, family: IpFamily) -> (RecordingNft, TableSync) {
        let fake = RecordingNft::new();
        let mut sync = TableSync::new();
        let table = desired_table(&port_plans(st, node, family), family, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        (fake, sync)
    }

    /// A packet from a pod's veth, from the underlay, or (from the node's own or a
    /// loopback address) sent by the node itself.
    fn packet(src: &str, dst: &str, port: u16, from_pod: bool) -> Packet {
        let origin = if from_pod {
            Origin::Interface("cyx0123456789a".into())
        } else if src == NODE1 || ip(src).is_loopback() {
            Origin::Node
        } else {
            Origin::Interface("eth0".into())
        };
        Packet {
            src: ip(src),
            dst: ip(dst),
            protocol: Protocol::Tcp,
            port,
            origin,
        }
    }

    fn dnat(list: &[(&str, bool)]) -> Outcome {
        Outcome::Dnat(list.iter().map(|(a, m)| (a.parse().unwrap(), *m)).collect())
    }

    fn run(fake: &RecordingNft, p: &Packet) -> Outcome {
        let table = fake.table(IpFamily::of(p.dst), TABLE).unwrap();
        trace(&table, p, &[ip(NODE1)])
    }

    #[test]
    fn every_service_path_goes_where_kube_proxy_sends_it() {
        let (fake, _) = synced(&cluster(), "n1", IpFamily::V4);
        let both = [("10.244.1.2:8080", false), ("10.244.2.2:8080", false)];
        // 1, 2: a pod reaches every endpoint and keeps its source.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.10", 80, true)),
            dnat(&both)
        );
        // 3: the node itself is masqueraded.
        assert_eq!(
            run(&fake, &packet(NODE1, "10.96.0.10", 80, false)),
            dnat(&[("10.244.1.2:8080", true), ("10.244.2.2:8080", true)])
        );
        // 4: hairpin: only the path back to itself is masqueraded.
        assert_eq!(
            run(&fake, &packet(POD1, "10.96.0.10", 80, true)),
            dnat(&[("10.244.1.2:8080", true), ("10.244.2.2:8080", false)])
        );
        // 5: NodePort from outside, masqueraded (eTP Cluster); never on loopback.
        assert_eq!(
            run(&fake, &packet("192.0.2.100", NODE1, 30080, false)),
            dnat(&[("10.244.1.2:8080", true), ("10.244.2.2:8080", true)])
        );
        assert_eq!(
            run(&fake, &packet("127.0.0.1", "127.0.0.1", 30080, false)),
            Outcome::Untouched
        );
        // 6: eTP Local on a node without a local endpoint drops; the ClusterIP works.
        assert_eq!(
            run(&fake, &packet("192.0.2.100", NODE1, 30081, false)),
            Outcome::Drop
        );
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.12", 80, true)),
            dnat(&[("10.244.2.2:8080", false)])
        );
        // 7: loadBalancerSourceRanges.
        assert_eq!(
            run(&fake, &packet("198.51.100.4", "203.0.113.7", 80, false)),
            dnat(&[("10.244.2.2:8080", true)])
        );
        assert_eq!(
            run(&fake, &packet("192.0.2.100", "203.0.113.7", 80, false)),
            Outcome::Drop
        );
        // 8: session affinity goes through its own chains to the same endpoints.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.13", 80, true)),
            dnat(&both)
        );
        // 10: no endpoints at all: rejected at once.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.11", 80, true)),
            Outcome::Reject
        );
        // Not a Service.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.244.2.2", 80, true)),
            Outcome::Untouched
        );
    }

    #[test]
    fn etp_local_keeps_the_source_on_a_node_with_a_local_endpoint() {
        let (fake, _) = synced(&cluster(), "n2", IpFamily::V4);
        assert_eq!(
            run(&fake, &packet("192.0.2.100", NODE1, 30081, false)),
            dnat(&[("10.244.2.2:8080", false)])
        );
    }

    #[test]
    fn ipv6_and_udp_ports_have_their_own_table_and_entries() {
        let (fake, _) = synced(&cluster(), "n1", IpFamily::V6);
        assert_eq!(
            run(&fake, &packet("fd00:10:244:1::9", "fd00:96::15", 80, true)),
            dnat(&[("[fd00:10:244:1::2]:8080", false)])
        );
        let (fake, _) = synced(&cluster(), "n1", IpFamily::V4);
        let mut udp = packet("10.244.1.9", "10.96.0.15", 53, true);
        udp.protocol = Protocol::Udp;
        assert_eq!(run(&fake, &udp), dnat(&[("10.244.1.2:5353", false)]));
    }

    #[test]
    fn a_partial_sync_emits_only_what_changed() {
        let mut st = cluster();
        let (fake, mut sync) = synced(&st, "n1", IpFamily::V4);
        fake.take_scripts();
        // One endpoint of "web" replaced.
        slice_mut(&mut st, "web").endpoints[1] = endpoint("10.244.2.3", "n2");
        let table = desired_table(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        assert_eq!(
            fake.take_scripts(),
            ["delete element ip calyx-proxy nodeport-endpoints-2 { tcp . 30080 . 1 }\n\
              delete element ip calyx-proxy service-endpoints-2 { 10.96.0.10 . tcp . 80 . 1 }\n\
              add element ip calyx-proxy hairpin { 10.244.2.3 . 10.244.2.3 }\n\
              add element ip calyx-proxy nodeport-endpoints-2 { tcp . 30080 . 1 : 10.244.2.3 . 8080 }\n\
              add element ip calyx-proxy service-endpoints-2 { 10.96.0.10 . tcp . 80 . 1 : 10.244.2.3 . 8080 }\n"]
        );
        // The old endpoint stays in the hairpin set: "sticky" and "lb" still use it.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.10", 80, true)),
            dnat(&[("10.244.1.2:8080", false), ("10.244.2.3:8080", false)])
        );
        // A Service gone: its entries go, nothing else is written.
        st.services.remove(&key("none"));
        let table = desired_table(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        assert_eq!(
            fake.take_scripts(),
            [
                "delete element ip calyx-proxy cluster-masquerade { 10.96.0.11 . tcp . 80 }\n\
              delete element ip calyx-proxy no-endpoint-services { 10.96.0.11 . tcp . 80 }\n"
            ]
        );
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.11", 80, true)),
            Outcome::Untouched
        );
        // Nothing changed: nothing written.
        sync.sync(&fake, &table, false).unwrap();
        assert!(fake.take_scripts().is_empty());
    }

    #[test]
    fn an_endpoint_count_change_moves_the_service_to_another_map() {
        let mut st = cluster();
        let (fake, mut sync) = synced(&st, "n1", IpFamily::V4);
        slice_mut(&mut st, "web")
            .endpoints
            .push(endpoint("10.244.3.2", "n3"));
        let table = desired_table(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.10", 80, true)),
            dnat(&[
                ("10.244.1.2:8080", false),
                ("10.244.2.2:8080", false),
                ("10.244.3.2:8080", false)
            ])
        );
        // Back to none: the 3-endpoint chain and map go away, and the Service rejects.
        slice_mut(&mut st, "web").endpoints.clear();
        let table = desired_table(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        let now = fake.table(IpFamily::V4, TABLE).unwrap();
        assert!(!now.chains.contains_key("service-lb-3"));
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.10", 80, true)),
            Outcome::Reject
        );
    }

    #[test]
    fn a_broken_base_chain_rule_changes_the_trace() {
        let (fake, _) = synced(&cluster(), "n1", IpFamily::V4);
        let mut table = fake.table(IpFamily::V4, TABLE).unwrap();
        let from_pod = packet("10.244.1.9", "10.96.0.10", 80, true);
        let keeps_source = dnat(&[("10.244.1.2:8080", false), ("10.244.2.2:8080", false)]);
        assert_eq!(trace(&table, &from_pod, &[ip(NODE1)]), keeps_source);
        // The pod-interface exemption lost: pods are masqueraded too.
        let services = &mut table.chains.get_mut("services").unwrap().rules;
        services[0] = services[0].replace(" iifname != \"cyx*\"", "");
        assert_eq!(
            trace(&table, &from_pod, &[ip(NODE1)]),
            dnat(&[("10.244.1.2:8080", true), ("10.244.2.2:8080", true)])
        );
        // The jump from the nat prerouting hook lost: nothing is translated.
        table
            .chains
            .get_mut("nat-prerouting")
            .unwrap()
            .rules
            .clear();
        assert_eq!(trace(&table, &from_pod, &[ip(NODE1)]), Outcome::Untouched);
        // The endpoints check not hooked: a Service without endpoints is not refused.
        let none = packet("10.244.1.9", "10.96.0.11", 80, true);
        assert_eq!(trace(&table, &none, &[ip(NODE1)]), Outcome::Reject);
        table
            .chains
            .get_mut("filter-forward")
            .unwrap()
            .rules
            .clear();
        assert_eq!(trace(&table, &none, &[ip(NODE1)]), Outcome::Untouched);
    }

    #[test]
    #[should_panic(expected = "the tracer does not understand rule `meta skuid 0 accept`")]
    fn a_rule_the_tracer_does_not_know_fails_the_test() {
        let (fake, _) = synced(&cluster(), "n1", IpFamily::V4);
        let mut table = fake.table(IpFamily::V4, TABLE).unwrap();
        table
            .chains
            .get_mut("services")
            .unwrap()
            .rules
            .insert(0, "meta skuid 0 accept".into());
        trace(
            &table,
            &packet("10.244.1.9", "10.96.0.10", 80, true),
            &[ip(NODE1)],
        );
    }
}
