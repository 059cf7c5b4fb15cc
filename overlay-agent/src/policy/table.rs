//! The kernel's side of NetworkPolicy as pure data: the one `inet calyx-policy` table a
//! node wants, computed from the model and the node's name. `TableSync` (the firewall
//! layer) writes only what differs from what the kernel holds.
//!
//! Layout (Calico's per-endpoint dispatch and per-policy chains, judged where
//! kube-network-policies judges, so every proxy mode is covered):
//! - Base chains at postrouting, after every DNAT (nftables, iptables and IPVS modes,
//!   kube-proxy too: IPVS forwards from LOCAL_IN to OUTPUT and never passes FORWARD)
//!   and before any masquerade: `egress` (priority -10) then `ingress` (-5); and
//!   `egress-to-node` at input (priority 101, after IPVS has taken what is its own) for
//!   what a pod sends to its node. Established and related packets pass first.
//! - `egress-v4`/`-v6` and `ingress-v4`/`-v6` map a local isolated pod's address to
//!   its profile chain; a pod's profile is the list of policies isolating it in that
//!   direction, so pods alike share one chain and a relabelled pod only moves between
//!   map elements.
//! - A profile chain jumps to each policy's chain, then counts and drops.
//! - A policy chain holds one rule per (rule, peer, port, family); a match counts in
//!   the policy's counter and accepts. Pod peers are address sets (one per distinct
//!   peer, shared by policies); named ports are sets of (address, protocol, port) over
//!   the destination pods, since one name may mean 80 on one pod and 81 on another.
//!
//! - `pod-sources` at prerouting (priority raw, before conntrack and every DNAT): a
//!   packet that came in on a pod's host veth must have a source the node routes
//!   back out of that veth (the plugin's host routes), else it is counted in
//!   `spoofed` and dropped. It needs no state of the agent's, so it holds from a
//!   pod's first packet; it is what makes a local pod's source address as good as
//!   its interface for the dispatch maps.
//! - `held-pods` at prerouting (after conntrack) and a rule of `ingress`: a pod the
//!   plugin created held (its host veth in `HELD_POD_GROUP`, because a policy of its
//!   namespace could isolate it) neither sends nor is sent anything but its node's
//!   traffic and replies, counted in `held`, until the agent has written its entries
//!   and released the veth. So a new pod is judged by its policies from its first
//!   packet, even before the agent has seen it, or while the agent is down.
//!
//! Accepting is final only for that base chain: a packet accepted by `egress` is
//! still judged by `ingress`; a drop anywhere is final.

use std::collections::{BTreeMap, BTreeSet};

use calyx_dataplane::firewall::nft::{Chain, Family, Hook, Set, SetKind, Table};
use calyx_dataplane::firewall::IpFamily;
use calyx_dataplane::HELD_POD_GROUP;
use ipnetwork::IpNetwork;

use super::model::{
    Cluster, Direction, Peer, Pod, Policy, PortRule, PortSpec, Protocol, Rule, Selector,
};

pub const TABLE: &str = "calyx-policy";

/// Base chains: name, hook, priority, and the direction they dispatch.
pub const EGRESS_CHAIN: &str = "egress";
pub const EGRESS_TO_NODE_CHAIN: &str = "egress-to-node";
pub const INGRESS_CHAIN: &str = "ingress";
pub const POD_SOURCES_CHAIN: &str = "pod-sources";

/// What the spoofing guard dropped.
pub const SPOOFED_COUNTER: &str = "spoofed";
pub const HELD_CHAIN: &str = "held-pods";
/// What held pods were not let send or receive.
pub const HELD_COUNTER: &str = "held";

/// nft's longest object name is 256 bytes; longer readable names become digests.
const MAX_NAME: usize = 200;

/// The element type of a family's addresses.
fn addr_type(fam: IpFamily) -> &'static str {
    match fam {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    }
}

/// How the family ends an object's name.
fn suffix(fam: IpFamily) -> &'static str {
    match fam {
        IpFamily::V4 => "v4",
        IpFamily::V6 => "v6",
    }
}

fn short_digest(text: &str) -> String {
    use sha1::{Digest, Sha1};
    hex::encode(Sha1::digest(text.as_bytes()))[..12].to_string()
}

/// `readable` when nft can hold it, else `prefix` + a digest of it.
fn object_name(prefix: &str, readable: String) -> String {
    if readable.len() <= MAX_NAME {
        readable
    } else {
        format!("{prefix}{}", short_digest(&readable))
    }
}

pub fn policy_chain(policy: &Policy, direction: Direction) -> String {
    object_name(
        "policy/",
        format!(
            "policy/{}/{}/{}",
            policy.key.namespace,
            policy.key.name,
            direction.name()
        ),
    )
}

/// The counter a policy's allowing rules count in.
pub fn allowed_counter(policy: &Policy, direction: Direction) -> String {
    object_name(
        "allowed/",
        format!(
            "allowed/{}/{}/{}",
            policy.key.namespace,
            policy.key.name,
            direction.name()
        ),
    )
}

/// The counter of what a namespace's isolated pods were denied.
pub fn denied_counter(namespace: &str, direction: Direction) -> String {
    object_name(
        "denied/",
        format!("denied/{namespace}/{}", direction.name()),
    )
}

fn dispatch_map(direction: Direction, fam: IpFamily) -> String {
    format!("{}-{}", direction.name(), suffix(fam))
}

/// The pods one pod peer names, for a policy in `namespace`: its identity for sharing.
fn peer_identity(peer: &Peer, namespace: &str) -> String {
    match peer {
        Peer::Pods {
            namespaces: None,
            pods,
        } => format!("ns={namespace} pods={pods:?}"),
        Peer::Pods {
            namespaces: Some(ns),
            pods,
        } => format!("namespaces={ns:?} pods={pods:?}"),
        Peer::Block { .. } => unreachable!("blocks are written inline"),
    }
}

/// What a set of pods' addresses holds: how it was computed, so that a later build
/// can patch it with the pods that changed instead of walking every pod again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SetSource {
    /// The addresses of `peer`'s pods, for a policy in `namespace`.
    Peer {
        peer: Peer,
        namespace: String,
        fam: IpFamily,
    },
    /// (address, protocol, number) of the port named `port` on the pods in
    /// `selected` (a policy's namespace and pod selector), or on every pod.
    NamedPort {
        selected: Option<(String, Selector)>,
        port: String,
        protocol: Protocol,
        fam: IpFamily,
    },
}

impl SetSource {
    fn has(&self, cluster: &Cluster, pod: &Pod) -> bool {
        match self {
            SetSource::Peer {
                peer, namespace, ..
            } => cluster.peer_has_pod(peer, namespace, pod),
            SetSource::NamedPort { selected, .. } => {
                !pod.host_network
                    && selected.as_ref().is_none_or(|(ns, selector)| {
                        pod.key.namespace == *ns && selector.matches(&pod.labels)
                    })
            }
        }
    }

    /// The elements `pod` brings, if it is one of the set's pods.
    fn elements(&self, pod: &Pod) -> Vec<String> {
        let (fam, named) = match self {
            SetSource::Peer { fam, .. } => (*fam, None),
            SetSource::NamedPort {
                port,
                protocol,
                fam,
                ..
            } => match pod.named_port(port, *protocol) {
                Some(number) => (*fam, Some((protocol.name(), number))),
                None => return Vec::new(),
            },
        };
        pod.addresses
            .iter()
            .filter(|ip| IpFamily::of(**ip) == fam)
            .map(|ip| match named {
                None => ip.to_string(),
                Some((protocol, number)) => format!("{ip} . {protocol} . {number}"),
            })
            .collect()
    }
}

/// A built table and what it was built from: the next build patches its pod sets
/// with the pods that changed (when the namespaces did not), as a change should
/// cost what it changes, not what the cluster holds.
pub struct Built {
    pub table: Table,
    cluster: Cluster,
    sources: BTreeMap<String, SetSource>,
}

/// The previous build and the pods changed since: (before, after).
struct Patch<'c> {
    built: &'c Built,
    changed: Vec<(Option<&'c Pod>, Option<&'c Pod>)>,
}

/// Builds the table; each piece is added once, named by what it holds.
struct Builder<'c> {
    cluster: &'c Cluster,
    /// The namespaces pods are in, each once.
    pod_namespaces: Vec<&'c str>,
    table: Table,
    sources: BTreeMap<String, SetSource>,
    patch: Option<Patch<'c>>,
}

impl Builder<'_> {
    fn set(&mut self, name: &str, declaration: &str) -> &mut Set {
        self.table
            .sets
            .entry(name.to_string())
            .or_insert_with(|| Set::new(SetKind::Set, declaration))
    }

    /// The set `name` of the pods `source` describes: the previous build's, patched,
    /// when it had the same; else computed over `candidates`.
    fn pod_set<'p>(
        &mut self,
        name: String,
        declaration: String,
        source: SetSource,
        candidates: impl Iterator<Item = &'p Pod>,
    ) -> String {
        if self.table.sets.contains_key(&name) {
            return name;
        }
        let previous = self.patch.as_ref().and_then(|patch| {
            let set = patch.built.table.sets.get(&name)?;
            (patch.built.sources.get(&name) == Some(&source)).then_some((set, &patch.changed))
        });
        let set = match previous {
            Some((set, changed)) => {
                let mut set = set.clone();
                // The namespaces are the previous build's (else there is no patch),
                // so membership reads the same against either cluster. Every pod's
                // old elements go before any new ones come: a pod that moved
                // (relabelled, rescheduled) keeps what it still has.
                for pod in changed.iter().filter_map(|(before, _)| *before) {
                    if source.has(self.cluster, pod) {
                        for element in source.elements(pod) {
                            set.elements.remove(&element);
                        }
                    }
                }
                for pod in changed.iter().filter_map(|(_, after)| *after) {
                    if source.has(self.cluster, pod) {
                        for element in source.elements(pod) {
                            set.insert(element, None);
                        }
                    }
                }
                set
            }
            None => {
                let mut set = Set::new(SetKind::Set, declaration);
                for pod in candidates.filter(|p| source.has(self.cluster, p)) {
                    for element in source.elements(pod) {
                        set.insert(element, None);
                    }
                }
                set
            }
        };
        self.table.sets.insert(name.clone(), set);
        self.sources.insert(name.clone(), source);
        name
    }

    /// The address set of the pods `peer` names (for a policy in `namespace`).
    fn peer_set(&mut self, peer: &Peer, namespace: &str, fam: IpFamily) -> String {
        let name = format!(
            "peer-{}-{}",
            short_digest(&peer_identity(peer, namespace)),
            suffix(fam)
        );
        // Only the namespaces the peer can name are walked.
        let cluster = self.cluster;
        let namespaces: Vec<&str> = match peer {
            Peer::Pods {
                namespaces: Some(selector),
                ..
            } => self
                .pod_namespaces
                .iter()
                .copied()
                .filter(|ns| selector.matches(&cluster.namespace_labels(ns)))
                .collect(),
            _ => vec![namespace],
        };
        let source = SetSource::Peer {
            peer: peer.clone(),
            namespace: namespace.to_string(),
            fam,
        };
        self.pod_set(
            name,
            format!("type {};", addr_type(fam)),
            source,
            namespaces.into_iter().flat_map(|ns| cluster.pods_in(ns)),
        )
    }

    /// The (address, protocol, port) set of the ports named `port_name` on the pods a
    /// named port of `policy` is resolved on: the selected pods for ingress; for egress
    /// every pod (the rule's peer match stands beside it).
    fn named_port_set(
        &mut self,
        policy: &Policy,
        direction: Direction,
        port_name: &str,
        protocol: super::model::Protocol,
        fam: IpFamily,
    ) -> String {
        let identity = match direction {
            Direction::Ingress => format!("selected by {}", policy.key),
            Direction::Egress => "every pod".to_string(),
        };
        let name = format!(
            "named-{}-{}",
            short_digest(&format!("{identity} port={port_name}/{}", protocol.name())),
            suffix(fam)
        );
        let cluster = self.cluster;
        let (selected, candidates): (_, Box<dyn Iterator<Item = &Pod>>) = match direction {
            Direction::Ingress => (
                Some((policy.key.namespace.clone(), policy.pod_selector.clone())),
                Box::new(cluster.pods_in(&policy.key.namespace)),
            ),
            Direction::Egress => (None, Box::new(cluster.pods.values())),
        };
        let source = SetSource::NamedPort {
            selected,
            port: port_name.to_string(),
            protocol,
            fam,
        };
        self.pod_set(
            name,
            format!("type {} . inet_proto . inet_service;", addr_type(fam)),
            source,
            candidates,
        )
    }

    /// The rules of `policy`'s chain for `direction`, which isolates `local` here.
    fn policy_rules(&mut self, policy: &Policy, direction: Direction) -> Vec<String> {
        let counter = allowed_counter(policy, direction);
        self.table.counters.insert(counter.clone());
        let ns = policy.key.namespace.clone();
        // The peer is the source for ingress, the destination for egress.
        let peer_side = match direction {
            Direction::Ingress => "saddr",
            Direction::Egress => "daddr",
        };
        let mut out = Vec::new();
        for rule in policy.rules(direction).unwrap_or_default() {
            for peer in peer_choices(rule) {
                for port in port_choices(rule) {
                    for fam in families(peer, port) {
                        let mut matches = Vec::new();
                        match peer {
                            None => {}
                            Some(p @ Peer::Pods { .. }) => {
                                let fam = fam.expect("pod peers are per family");
                                let set = self.peer_set(p, &ns, fam);
                                matches.push(format!("{} {peer_side} @{set}", fam.nft()));
                            }
                            Some(Peer::Block { cidr, except }) => {
                                let fam = fam.expect("a block has one family");
                                matches.push(format!("{} {peer_side} {cidr}", fam.nft()));
                                if !except.is_empty() {
                                    let list: Vec<String> =
                                        except.iter().map(IpNetwork::to_string).collect();
                                    matches.push(format!(
                                        "{} {peer_side} != {{ {} }}",
                                        fam.nft(),
                                        list.join(", ")
                                    ));
                                }
                            }
                        }
                        match port {
                            None => {}
                            Some(PortRule {
                                protocol,
                                port: PortSpec::Any,
                            }) => matches.push(format!("meta l4proto {}", protocol.name())),
                            Some(PortRule {
                                protocol,
                                port: PortSpec::Range { port, end },
                            }) => {
                                let ports = if port == end {
                                    port.to_string()
                                } else {
                                    format!("{port}-{end}")
                                };
                                matches.push(format!(
                                    "meta l4proto {} th dport {ports}",
                                    protocol.name()
                                ));
                            }
                            Some(PortRule {
                                protocol,
                                port: PortSpec::Named(name),
                            }) => {
                                let fam = fam.expect("named ports are per family");
                                let set =
                                    self.named_port_set(policy, direction, name, *protocol, fam);
                                matches.push(format!(
                                    "{} daddr . meta l4proto . th dport @{set}",
                                    fam.nft()
                                ));
                            }
                        }
                        matches.push(format!("counter name {counter} accept"));
                        out.push(matches.join(" "));
                    }
                }
            }
        }
        out
    }
}

/// Each peer of a rule, or one "any peer".
fn peer_choices(rule: &Rule) -> Vec<Option<&Peer>> {
    if rule.peers.is_empty() {
        vec![None]
    } else {
        rule.peers.iter().map(Some).collect()
    }
}

fn port_choices(rule: &Rule) -> Vec<Option<&PortRule>> {
    if rule.ports.is_empty() {
        vec![None]
    } else {
        rule.ports.iter().map(Some).collect()
    }
}

/// The families one (peer, port) pair needs a rule for: None is one rule for both.
fn families(peer: Option<&Peer>, port: Option<&PortRule>) -> Vec<Option<IpFamily>> {
    match peer {
        Some(Peer::Block { cidr, .. }) => {
            vec![Some(if cidr.is_ipv4() {
                IpFamily::V4
            } else {
                IpFamily::V6
            })]
        }
        Some(Peer::Pods { .. }) => IpFamily::BOTH.map(Some).to_vec(),
        None if matches!(
            port,
            Some(PortRule {
                port: PortSpec::Named(_),
                ..
            })
        ) =>
        {
            IpFamily::BOTH.map(Some).to_vec()
        }
        None => vec![None],
    }
}

fn base(hook: &'static str, priority: i32, rules: Vec<String>) -> Chain {
    Chain::base(
        Hook {
            kind: "filter",
            hook,
            priority,
        },
        rules,
    )
}

/// The table `node` wants for `cluster`.
pub fn desired_table(cluster: &Cluster, node: &str) -> Table {
    build(cluster, node, None).table
}

/// The table `node` wants for `cluster`, its pod sets patched from `previous` where
/// that build had them and the namespaces are as they were.
pub fn build(cluster: &Cluster, node: &str, previous: Option<&Built>) -> Built {
    let mut pod_namespaces: Vec<&str> = cluster.pods.keys().map(|k| k.namespace.as_str()).collect();
    pod_namespaces.dedup();
    let patch = previous
        .filter(|p| {
            p.cluster.namespaces.ptr_eq(&cluster.namespaces)
                || p.cluster.namespaces == cluster.namespaces
        })
        .map(|built| Patch {
            built,
            changed: built
                .cluster
                .pods
                .diff(&cluster.pods)
                .map(|d| match d {
                    imbl::ordmap::DiffItem::Add(_, new) => (None, Some(new)),
                    imbl::ordmap::DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
                    imbl::ordmap::DiffItem::Remove(_, old) => (Some(old), None),
                })
                .collect(),
        });
    let mut b = Builder {
        cluster,
        pod_namespaces,
        table: Table::new(Family::Inet, TABLE),
        sources: BTreeMap::new(),
        patch,
    };
    for direction in [Direction::Ingress, Direction::Egress] {
        for fam in IpFamily::BOTH {
            b.table.sets.insert(
                dispatch_map(direction, fam),
                Set::new(SetKind::Map, format!("type {} : verdict;", addr_type(fam))),
            );
        }
    }
    let local: Vec<&Pod> = cluster
        .pods
        .values()
        .filter(|p| p.node == node && !p.host_network && !p.addresses.is_empty())
        .collect();
    // A pod reaching itself (through a Service) is never judged.
    for fam in IpFamily::BOTH {
        let name = format!("itself-{}", suffix(fam));
        let pairs: Vec<String> = local
            .iter()
            .flat_map(|p| &p.addresses)
            .filter(|ip| IpFamily::of(**ip) == fam)
            .map(|ip| format!("{ip} . {ip}"))
            .collect();
        let set = b.set(&name, &format!("type {0} . {0};", addr_type(fam)));
        for pair in pairs {
            set.insert(pair, None);
        }
    }

    let mut policy_chains: BTreeSet<(String, Direction)> = BTreeSet::new();
    for direction in [Direction::Ingress, Direction::Egress] {
        let mut profiles: BTreeMap<Vec<String>, Vec<&Pod>> = BTreeMap::new();
        let mut profile_namespace: BTreeMap<Vec<String>, String> = BTreeMap::new();
        for pod in &local {
            let policies: Vec<&Policy> = cluster.isolating(pod, direction).collect();
            if policies.is_empty() {
                continue;
            }
            let chains: Vec<String> = policies
                .iter()
                .map(|p| {
                    if policy_chains.insert((p.key.to_string(), direction)) {
                        let rules = b.policy_rules(p, direction);
                        b.table
                            .chains
                            .insert(policy_chain(p, direction), Chain::new(rules));
                    }
                    policy_chain(p, direction)
                })
                .collect();
            profile_namespace.insert(chains.clone(), pod.key.namespace.clone());
            profiles.entry(chains).or_default().push(pod);
        }
        for (chains, pods) in profiles {
            let name = format!("{}-{}", direction.name(), short_digest(&chains.join("\n")));
            let denied = denied_counter(&profile_namespace[&chains], direction);
            b.table.counters.insert(denied.clone());
            let mut rules: Vec<String> = chains.iter().map(|c| format!("jump {c}")).collect();
            rules.push(format!("counter name {denied} drop"));
            b.table.chains.insert(name.clone(), Chain::new(rules));
            for pod in pods {
                for ip in &pod.addresses {
                    let map = dispatch_map(direction, IpFamily::of(*ip));
                    b.table
                        .sets
                        .get_mut(&map)
                        .expect("dispatch maps are made above")
                        .insert(ip.to_string(), Some(format!("goto {name}")));
                }
            }
        }
    }

    let dispatch = |direction: Direction, side: &str| -> Vec<String> {
        IpFamily::BOTH
            .iter()
            .map(|fam| {
                format!(
                    "{} {side} vmap @{}",
                    fam.nft(),
                    dispatch_map(direction, *fam)
                )
            })
            .collect()
    };
    let itself: Vec<String> = IpFamily::BOTH
        .iter()
        .map(|fam| {
            format!(
                "{0} saddr . {0} daddr @itself-{1} accept",
                fam.nft(),
                suffix(*fam)
            )
        })
        .collect();
    let established = "ct state established,related accept".to_string();

    let mut egress = vec![established.clone()];
    egress.extend(itself.iter().cloned());
    egress.extend(dispatch(Direction::Egress, "saddr"));
    b.table
        .chains
        .insert(EGRESS_CHAIN.into(), base("postrouting", -10, egress));

    let mut to_node = vec![established.clone()];
    to_node.extend(dispatch(Direction::Egress, "saddr"));
    b.table
        .chains
        .insert(EGRESS_TO_NODE_CHAIN.into(), base("input", 101, to_node));

    // The node always reaches its own pods (kubelet's probes): its own addresses are
    // the packets whose source is local.
    let held = format!("oifgroup {HELD_POD_GROUP}");
    let mut ingress = vec![
        established.clone(),
        "fib saddr type local accept".to_string(),
        format!("{held} counter name {HELD_COUNTER} drop"),
    ];
    ingress.extend(itself);
    ingress.extend(dispatch(Direction::Ingress, "daddr"));
    b.table
        .chains
        .insert(INGRESS_CHAIN.into(), base("postrouting", -5, ingress));

    b.table.counters.insert(HELD_COUNTER.into());
    let held = format!("iifgroup {HELD_POD_GROUP}");
    b.table.chains.insert(
        HELD_CHAIN.into(),
        base(
            "prerouting",
            -150,
            vec![
                format!("{held} {established}"),
                format!("{held} counter name {HELD_COUNTER} drop"),
            ],
        ),
    );

    b.table.counters.insert(SPOOFED_COUNTER.into());
    b.table.chains.insert(
        POD_SOURCES_CHAIN.into(),
        base("prerouting", -300, pod_sources()),
    );
    Built {
        table: b.table,
        cluster: cluster.clone(),
        sources: b.sources,
    }
}

/// What each of the table's counters counts, as /metrics says it.
fn count_help(metric: &str) -> &'static str {
    match metric {
        "allowed" => "Packets a NetworkPolicy let start a connection, per namespace, policy and direction",
        "denied" => "Packets dropped as no policy of an isolated pod allows them, per namespace and direction",
        "spoofed" => "Packets a pod sent from an address not its own, dropped at its veth",
        _ => "Packets to or from a new pod not yet classified, dropped",
    }
}

/// The table's named counters (name -> packets, bytes, as the kernel holds them) as
/// /metrics shows them. An allowing rule counts the packets it accepts: the first of
/// each connection, as the rest pass as established.
pub fn kernel_counts(counters: BTreeMap<String, (u64, u64)>) -> Vec<crate::metrics::KernelCount> {
    counters
        .into_iter()
        .filter_map(|(name, (packets, bytes))| {
            let parts: Vec<&str> = name.split('/').collect();
            let (metric, labels): (&'static str, Vec<(&str, String)>) = match parts.as_slice() {
                ["allowed", ns, policy, direction] => (
                    "allowed",
                    vec![
                        ("namespace", ns.to_string()),
                        ("policy", policy.to_string()),
                        ("direction", direction.to_string()),
                    ],
                ),
                ["denied", ns, direction] => (
                    "denied",
                    vec![
                        ("namespace", ns.to_string()),
                        ("direction", direction.to_string()),
                    ],
                ),
                // Names too long for nft, kept as their digest.
                ["allowed", _] => ("allowed", vec![("counter", name.clone())]),
                ["denied", _] => ("denied", vec![("counter", name.clone())]),
                [SPOOFED_COUNTER] => ("spoofed", Vec::new()),
                [HELD_COUNTER] => ("held", Vec::new()),
                _ => return None,
            };
            Some(crate::metrics::KernelCount {
                name: metric,
                help: count_help(metric),
                labels,
                packets,
                bytes,
            })
        })
        .collect()
}

/// A pod sends only from the addresses the node routes to its veth (strict reverse
/// path, as `rp_filter=1` but for both families and counted). IPv6's link-local
/// sources (neighbour and router discovery; never forwarded) and the unspecified
/// source of duplicate address detection pass.
fn pod_sources() -> Vec<String> {
    let pods = format!("iifname \"{}*\"", calyx_dataplane::HOST_VETH_PREFIX);
    vec![
        format!("{pods} ip6 saddr fe80::/10 accept"),
        format!("{pods} ip6 saddr :: meta l4proto ipv6-icmp accept"),
        format!("{pods} fib saddr . iif oif missing counter name {SPOOFED_COUNTER} drop"),
    ]
}

#[cfg(test)]
mod tests {
    use calyx_dataplane::firewall::nft::{RecordingNft, TableSync};

    use super::*;
    use crate::policy::model::*;

    fn pod(name: &str, node: &str, ip: &str, app: &str) -> Pod {
        Pod {
            key: PodKey {
                namespace: "shop".into(),
                name: name.into(),
            },
            labels: [("app".to_string(), app.to_string())].into(),
            node: node.into(),
            addresses: vec![ip.parse().unwrap()],
            named_ports: vec![NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            host_network: false,
        }
    }

    fn app(value: &str) -> Selector {
        Selector {
            match_labels: [("app".to_string(), value.to_string())].into(),
            match_expressions: Vec::new(),
        }
    }

    /// web takes the http port from clients; db takes anything from web.
    fn cluster(pods: &[Pod]) -> Cluster {
        let mut c = Cluster::default();
        for p in pods {
            c.pods.insert(p.key.clone(), p.clone());
        }
        for (name, selected, peer, port) in [
            ("web", "web", "client", Some(PortSpec::Named("http".into()))),
            ("db", "db", "web", None),
        ] {
            let key = PolicyKey {
                namespace: "shop".into(),
                name: name.into(),
            };
            let rule = Rule {
                peers: vec![Peer::Pods {
                    namespaces: None,
                    pods: app(peer),
                }],
                ports: port
                    .map(|port| PortRule {
                        protocol: Protocol::Tcp,
                        port,
                    })
                    .into_iter()
                    .collect(),
            };
            c.policies.insert(
                key.clone(),
                Policy {
                    key,
                    pod_selector: app(selected),
                    ingress: Some(vec![rule]),
                    egress: None,
                },
            );
        }
        c
    }

    /// The script that takes the kernel from `before` to `after`, on node n1.
    fn change(before: &Cluster, after: &Cluster) -> Vec<String> {
        let fake = RecordingNft::new();
        let mut sync = TableSync::new();
        sync.sync(&fake, &desired_table(before, "n1"), false)
            .unwrap();
        fake.take_scripts();
        sync.sync(&fake, &desired_table(after, "n1"), false)
            .unwrap();
        fake.take_scripts()
            .iter()
            .flat_map(|s| s.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    fn only_elements(lines: &[String]) {
        assert!(!lines.is_empty(), "the change wrote nothing");
        for line in lines {
            assert!(
                line.starts_with("add element ") || line.starts_with("delete element "),
                "not an element change: {line}\nin {lines:#?}"
            );
        }
    }

    #[test]
    fn kernel_counters_become_metrics_with_one_help_per_name() {
        let counters = [
            ("allowed/x/web/ingress", (3, 180)),
            ("allowed/5f1c0ffee123", (1, 60)),
            ("denied/x/ingress", (7, 420)),
            ("denied/0123456789ab", (2, 120)),
            ("spoofed", (4, 240)),
            ("held", (5, 300)),
            ("something-else", (9, 9)),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        let counts = kernel_counts(counters);
        assert_eq!(counts.len(), 6, "{counts:?}");
        for count in &counts {
            assert_eq!(count.help, count_help(count.name), "{count:?}");
        }
        let denied: Vec<_> = counts.iter().filter(|c| c.name == "denied").collect();
        assert_eq!(denied.len(), 2);
        let web = counts
            .iter()
            .find(|c| c.name == "allowed" && c.labels.len() == 3)
            .expect("the readable allowed counter");
        assert_eq!((web.packets, web.bytes), (3, 180));
        assert_eq!(
            web.labels,
            vec![
                ("namespace", "x".to_string()),
                ("policy", "web".to_string()),
                ("direction", "ingress".to_string())
            ]
        );
    }

    #[test]
    fn pods_coming_going_and_relabelled_change_only_set_elements() {
        let base = [
            pod("web-1", "n1", "10.244.1.1", "web"),
            pod("db-1", "n1", "10.244.1.2", "db"),
            pod("client-1", "n2", "10.244.2.1", "client"),
            pod("web-2", "n2", "10.244.2.2", "web"),
        ];
        let before = cluster(&base);

        // A pod relabelled from web to db, both profiles already on the node: it
        // moves between dispatch elements and peer sets, no chain is touched.
        let mut relabelled = base.to_vec();
        relabelled.push(pod("web-3", "n1", "10.244.1.3", "web"));
        let mut moved = relabelled.clone();
        moved[4].labels.insert("app".into(), "db".into());
        let lines = change(&cluster(&relabelled), &cluster(&moved));
        only_elements(&lines);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("ingress-v4 { 10.244.1.3 : goto ingress-")),
            "{lines:#?}"
        );

        // A new client on another node: only the peer set of web's policy grows.
        let mut added = base.to_vec();
        added.push(pod("client-2", "n2", "10.244.2.9", "client"));
        let lines = change(&before, &cluster(&added));
        only_elements(&lines);
        assert_eq!(lines.len(), 1, "{lines:#?}");

        // A local web pod going while another stays: its dispatch, itself, peer and
        // named-port elements. (The last one going takes the chains with it: no local
        // pod is isolated by that policy any more.)
        let lines = change(&cluster(&relabelled), &cluster(&relabelled[1..]));
        only_elements(&lines);
        assert!(
            lines.iter().all(|l| l.starts_with("delete element")),
            "{lines:#?}"
        );
    }
}

#[cfg(test)]
mod netlink_tests {
    use calyx_dataplane::firewall::nft::{netlink, plan};

    use super::*;
    use crate::policy::model::*;

    #[test]
    fn element_changes_of_the_policy_table_go_over_netlink() {
        let mut c = Cluster::default();
        for (name, node, ip, app) in [
            ("web", "n1", "10.244.1.1", "web"),
            ("client", "n2", "10.244.2.1", "client"),
            ("other", "n2", "10.244.2.2", "other"),
        ] {
            let key = PodKey {
                namespace: "shop".into(),
                name: name.into(),
            };
            c.pods.insert(
                key.clone(),
                Pod {
                    key,
                    labels: [("app".to_string(), app.to_string())].into(),
                    node: node.into(),
                    addresses: vec![ip.parse().unwrap()],
                    named_ports: vec![],
                    host_network: false,
                },
            );
        }
        let key = PolicyKey {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let app = |v: &str| Selector {
            match_labels: [("app".to_string(), v.to_string())].into(),
            match_expressions: vec![],
        };
        c.policies.insert(
            key.clone(),
            Policy {
                key,
                pod_selector: app("web"),
                ingress: Some(vec![Rule {
                    peers: vec![Peer::Pods {
                        namespaces: None,
                        pods: app("client"),
                    }],
                    ports: vec![],
                }]),
                egress: None,
            },
        );
        let before = desired_table(&c, "n1");
        let other = PodKey {
            namespace: "shop".into(),
            name: "other".into(),
        };
        c.pods
            .get_mut(&other)
            .unwrap()
            .labels
            .insert("app".into(), "client".into());
        let after = desired_table(&c, "n1");
        let tx = plan(Some(&before), &after);
        assert_eq!(tx.ops.len(), 1, "{:?}", tx.script());
        assert!(netlink::encode(&tx, &after).is_some(), "{}", tx.script());
    }
}
