//! IPVS mode with kube-proxy's names, so runbooks written for kube-proxy's IPVS mode
//! apply: the `kube-ipvs0` dummy device holding every ClusterIP, externalIP and
//! LoadBalancer IP; an IPVS virtual service per (IP, protocol, port) and per NodePort on
//! each node-port address, masquerading to the ready endpoints; kube-proxy's ipsets
//! (KUBE-CLUSTER-IP, KUBE-LOOP-BACK, KUBE-NODE-PORT-*, ... and KUBE-6-* for IPv6) and
//! chains (KUBE-SERVICES, KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-NODE-PORT,
//! KUBE-LOAD-BALANCER, KUBE-FORWARD, KUBE-IPVS-FILTER), mark 0x4000.
//!
//! `desired` computes all of it as data from the port plans; `IpvsSync` writes what
//! differs from the kernel: sets (one `ipset restore`), then rules (one
//! `iptables-restore`), then addresses and virtual services (one netlink batch).
//! A real server that goes away is drained, not cut: weight 0 until its connections end
//! or `drain_timeout` passes (kubernetes#57841).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures::StreamExt;

use calyx_dataplane::firewall::ipset::{self, IpsetSync, SetSpec};
use calyx_dataplane::firewall::iptables::{Jump, Ownership, Ruleset};
use calyx_dataplane::firewall::IpFamily;
use calyx_dataplane::ipvs::{
    self, RealServer, ServiceId, ServiceSettings, Services, VirtualService,
};

use super::iptables::POD_INTERFACES;
use super::model::{PortPlan, Protocol, ServiceKey};
use super::nftables::MASQUERADE_MARK;

/// The dummy device holding the Service addresses (kept down: IPVS needs them local).
pub const DUMMY: &str = "kube-ipvs0";

/// The chains only this mode has.
const IPVS_ONLY_CHAINS: [&str; 4] = [
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-IPVS-FILTER",
    "KUBE-SOURCE-RANGES-FIREWALL",
];

/// The chains this mode owns. kube-proxy's iptables-mode chains are claimed too, so a
/// switch from iptables mode removes them in the same transaction.
pub fn ownership() -> Ownership {
    let mut owner = super::iptables::ownership();
    owner.exact.extend(IPVS_ONLY_CHAINS);
    owner
}

/// kube-proxy's set names; IPv6 ones have `KUBE-6-` for `KUBE-`.
const CLUSTER_IP: &str = "KUBE-CLUSTER-IP";
const LOOP_BACK: &str = "KUBE-LOOP-BACK";
const EXTERNAL_IP: &str = "KUBE-EXTERNAL-IP";
const EXTERNAL_IP_LOCAL: &str = "KUBE-EXTERNAL-IP-LOCAL";
const LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
const LOAD_BALANCER_LOCAL: &str = "KUBE-LOAD-BALANCER-LOCAL";
const LOAD_BALANCER_FW: &str = "KUBE-LOAD-BALANCER-FW";
const LOAD_BALANCER_SOURCE_CIDR: &str = "KUBE-LOAD-BALANCER-SOURCE-CIDR";
const NODE_PORT_TCP: &str = "KUBE-NODE-PORT-TCP";
const NODE_PORT_LOCAL_TCP: &str = "KUBE-NODE-PORT-LOCAL-TCP";
const NODE_PORT_UDP: &str = "KUBE-NODE-PORT-UDP";
const NODE_PORT_LOCAL_UDP: &str = "KUBE-NODE-PORT-LOCAL-UDP";
const NODE_PORT_SCTP: &str = "KUBE-NODE-PORT-SCTP-HASH";
const NODE_PORT_LOCAL_SCTP: &str = "KUBE-NODE-PORT-LOCAL-SCTP-HASH";
const HEALTH_CHECK_NODE_PORT: &str = "KUBE-HEALTH-CHECK-NODE-PORT";
const IPVS_IPS: &str = "KUBE-IPVS-IPS";
/// Calyx's own: Service ports with no endpoint to reach, refused at once (IPVS's own
/// ICMP error for an empty virtual service does not reach IPv6 clients here).
const NO_ENDPOINTS: &str = "CALYX-NO-ENDPOINTS";

const SETS: [(&str, &str); 17] = [
    (NO_ENDPOINTS, "hash:ip,port"),
    (CLUSTER_IP, "hash:ip,port"),
    (LOOP_BACK, "hash:ip,port,ip"),
    (EXTERNAL_IP, "hash:ip,port"),
    (EXTERNAL_IP_LOCAL, "hash:ip,port"),
    (LOAD_BALANCER, "hash:ip,port"),
    (LOAD_BALANCER_LOCAL, "hash:ip,port"),
    (LOAD_BALANCER_FW, "hash:ip,port"),
    (LOAD_BALANCER_SOURCE_CIDR, "hash:ip,port,net"),
    (NODE_PORT_TCP, "bitmap:port"),
    (NODE_PORT_LOCAL_TCP, "bitmap:port"),
    (NODE_PORT_UDP, "bitmap:port"),
    (NODE_PORT_LOCAL_UDP, "bitmap:port"),
    (NODE_PORT_SCTP, "hash:ip,port"),
    (NODE_PORT_LOCAL_SCTP, "hash:ip,port"),
    (HEALTH_CHECK_NODE_PORT, "bitmap:port"),
    (IPVS_IPS, "hash:ip"),
];

/// A set's name in `family`: IPv6 ones as kube-proxy names them, `KUBE-6-` for
/// `KUBE-` and cut to ipset's 31 characters (KUBE-6-LOAD-BALANCER-SOURCE-CID).
pub fn set_name(name: &str, family: IpFamily) -> String {
    match family {
        IpFamily::V4 => name.to_string(),
        IpFamily::V6 => {
            let (prefix, rest) = name.split_once('-').unwrap_or(("", name));
            let mut v6 = format!("{prefix}-6-{rest}");
            v6.truncate(31);
            v6
        }
    }
}

/// Whether a set is this mode's (either family).
pub fn owns_set(name: &str) -> bool {
    SETS.iter()
        .any(|(n, _)| *n == name || set_name(n, IpFamily::V6) == name)
}

fn owns_set_v4(name: &str) -> bool {
    SETS.iter().any(|(n, _)| *n == name)
}

fn owns_set_v6(name: &str) -> bool {
    SETS.iter().any(|(n, _)| set_name(n, IpFamily::V6) == name)
}

fn ipvs_protocol(p: Protocol) -> ipvs::Protocol {
    match p {
        Protocol::Tcp => ipvs::Protocol::Tcp,
        Protocol::Udp => ipvs::Protocol::Udp,
        Protocol::Sctp => ipvs::Protocol::Sctp,
    }
}

/// Everything this mode wants in one family.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub services: Services,
    /// Addresses on kube-ipvs0.
    pub addresses: BTreeSet<IpAddr>,
    /// In `SETS`' order.
    pub sets: Vec<SetSpec>,
    pub ruleset: Ruleset,
    /// The node addresses NodePorts were opened on.
    pub node_ips: Vec<IpAddr>,
}

/// What the node contributes: where NodePorts open, which health-check ports exist.
#[cfg(test)]
pub struct Node<'a> {
    /// The node's own addresses that NodePorts answer on (in this family).
    pub nodeport_ips: &'a [IpAddr],
    pub health_check_ports: &'a [u16],
    pub default_scheduler: &'a str,
}

/// The whole wanted state at once (the controller keeps an `Assembler` instead).
#[cfg(test)]
pub fn desired(plans: &[PortPlan], family: IpFamily, node: &Node) -> Desired {
    let mut assembler = Assembler::new(family, node.nodeport_ips, node.default_scheduler);
    let mut by_service: BTreeMap<&ServiceKey, Vec<PortPlan>> = BTreeMap::new();
    for plan in plans {
        by_service
            .entry(&plan.service)
            .or_default()
            .push(plan.clone());
    }
    for (key, plans) in by_service {
        assembler.replace(key, &plans);
    }
    assembler.set_health_check_ports(node.health_check_ports);
    assembler.desired
}

/// An entry of one of `SETS` (by its index there).
type Entry = (usize, String);

fn set_index(name: &str) -> usize {
    SETS.iter()
        .position(|(n, _)| *n == name)
        .expect("one of SETS")
}

/// One Service's share of the wanted state (its virtual services themselves are kept
/// in the assembler's `claims`).
#[derive(Debug, Default)]
struct Share {
    services: Vec<ServiceId>,
    addresses: Vec<IpAddr>,
    entries: Vec<Entry>,
}

/// What changed in the wanted state since it was last taken: all a partial sync
/// compares with the kernel.
#[derive(Debug, Default)]
pub struct Touched {
    pub services: BTreeSet<ServiceId>,
    pub addresses: BTreeSet<IpAddr>,
    entries: BTreeSet<Entry>,
}

/// One family's wanted state, kept across changes: a changed Service's share is taken
/// back and its new one added, so a change costs its own size, not the cluster's.
/// Addresses and set entries several Services share are counted; a virtual service two
/// Services claim (one externalIP:port) goes to the first by namespace/name.
pub struct Assembler {
    family: IpFamily,
    default_scheduler: String,
    shares: HashMap<ServiceKey, Share>,
    claims: HashMap<ServiceId, BTreeMap<ServiceKey, VirtualService>>,
    address_count: HashMap<IpAddr, usize>,
    entry_count: HashMap<Entry, usize>,
    health_check_ports: Vec<u16>,
    desired: Desired,
    touched: Touched,
}

impl Assembler {
    pub fn new(family: IpFamily, nodeport_ips: &[IpAddr], default_scheduler: &str) -> Assembler {
        Assembler {
            family,
            default_scheduler: default_scheduler.to_string(),
            shares: HashMap::new(),
            claims: HashMap::new(),
            address_count: HashMap::new(),
            entry_count: HashMap::new(),
            health_check_ports: Vec::new(),
            desired: Desired {
                services: Services::new(),
                addresses: BTreeSet::new(),
                sets: SETS
                    .iter()
                    .map(|(name, kind)| SetSpec::new(set_name(name, family), kind, family))
                    .collect(),
                ruleset: ruleset(family),
                node_ips: nodeport_ips.to_vec(),
            },
            touched: Touched::default(),
        }
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// What changed since the last call.
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    /// Sets one Service's ports (none: the Service is gone).
    pub fn replace(&mut self, key: &ServiceKey, plans: &[PortPlan]) {
        if let Some(old) = self.shares.remove(key) {
            for id in &old.services {
                let Some(claims) = self.claims.get_mut(id) else {
                    continue;
                };
                claims.remove(key);
                let winner = claims.values().next().cloned();
                if claims.is_empty() {
                    self.claims.remove(id);
                }
                self.set_service(*id, winner);
            }
            for ip in &old.addresses {
                if count_down(&mut self.address_count, ip) {
                    self.desired.addresses.remove(ip);
                    self.touched.addresses.insert(*ip);
                }
            }
            for entry in old.entries {
                self.take_entry(entry);
            }
        }
        if plans.is_empty() {
            return;
        }
        let (new, services) = share(
            plans,
            self.family,
            &self.desired.node_ips,
            &self.default_scheduler,
        );
        for (id, service) in services {
            let claims = self.claims.entry(id).or_default();
            claims.insert(key.clone(), service);
            let winner = claims.values().next().cloned();
            self.set_service(id, winner);
        }
        for ip in &new.addresses {
            if count_up(&mut self.address_count, *ip) {
                self.desired.addresses.insert(*ip);
                self.touched.addresses.insert(*ip);
            }
        }
        for entry in &new.entries {
            self.put_entry(entry.clone());
        }
        self.shares.insert(key.clone(), new);
    }

    /// The node's health-check ports (eTP Local Services), opened in their set.
    pub fn set_health_check_ports(&mut self, ports: &[u16]) {
        let mut ports = ports.to_vec();
        ports.sort_unstable();
        ports.dedup();
        if ports == self.health_check_ports {
            return;
        }
        let set = set_index(HEALTH_CHECK_NODE_PORT);
        for port in std::mem::take(&mut self.health_check_ports) {
            self.take_entry((set, port.to_string()));
        }
        for port in &ports {
            self.put_entry((set, port.to_string()));
        }
        self.health_check_ports = ports;
    }

    /// Counts one more wanter of `entry`; the first puts it in its set.
    fn put_entry(&mut self, entry: Entry) {
        if count_up(&mut self.entry_count, entry.clone()) {
            self.desired.sets[entry.0].entries.insert(entry.1.clone());
            self.touched.entries.insert(entry);
        }
    }

    /// Counts one wanter of `entry` less; the last takes it out of its set.
    fn take_entry(&mut self, entry: Entry) {
        if count_down(&mut self.entry_count, &entry) {
            self.desired.sets[entry.0].entries.remove(&entry.1);
            self.touched.entries.insert(entry);
        }
    }

    fn set_service(&mut self, id: ServiceId, service: Option<VirtualService>) {
        let changed = match service {
            Some(s) => self.desired.services.insert(id, s.clone()).as_ref() != Some(&s),
            None => self.desired.services.remove(&id).is_some(),
        };
        if changed {
            self.touched.services.insert(id);
        }
    }
}

/// Counts one more; true when it is the first.
fn count_up<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: K) -> bool {
    let n = counts.entry(key).or_insert(0);
    *n += 1;
    *n == 1
}

/// Counts one less; true when it was the last.
fn count_down<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) -> bool {
    match counts.get_mut(key) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            counts.remove(key);
            true
        }
        None => false,
    }
}

/// One Service's virtual services, kube-ipvs0 addresses and set entries.
fn share(
    plans: &[PortPlan],
    family: IpFamily,
    nodeport_ips: &[IpAddr],
    default_scheduler: &str,
) -> (Share, Vec<(ServiceId, VirtualService)>) {
    let mut out = Share::default();
    let mut add = |set: &str, entry: String| out.entries.push((set_index(set), entry));
    let mut services = Vec::new();
    let mut addresses = Vec::new();
    for plan in plans {
        let proto = plan.protocol.name();
        let settings = ServiceSettings {
            scheduler: plan
                .ipvs_scheduler
                .clone()
                .unwrap_or_else(|| default_scheduler.to_string()),
            persistence: plan.affinity_seconds,
            scheduler_flags: 0,
        };
        let mut virtual_service = |ip: IpAddr, port: u16, endpoints: &[SocketAddr]| {
            let id = ServiceId {
                address: SocketAddr::new(ip, port),
                protocol: ipvs_protocol(plan.protocol),
            };
            if services.iter().any(|(s, _)| *s == id) {
                return; // Listed twice (two ports alike): the first stands.
            }
            let servers = endpoints
                .iter()
                .map(|ep| {
                    let server = RealServer {
                        weight: 1,
                        active: 0,
                        inactive: 0,
                    };
                    (*ep, server)
                })
                .collect();
            let service = VirtualService {
                settings: settings.clone(),
                servers,
            };
            services.push((id, service));
        };
        for vip in &plan.cluster_ips {
            virtual_service(*vip, plan.port, &plan.cluster.endpoints);
            addresses.push(*vip);
            add(CLUSTER_IP, format!("{vip},{proto}:{}", plan.port));
            if plan.cluster.endpoints.is_empty() {
                add(NO_ENDPOINTS, format!("{vip},{proto}:{}", plan.port));
            }
        }
        for ip in &plan.external_ips {
            virtual_service(*ip, plan.port, &plan.external.endpoints);
            addresses.push(*ip);
            let entry = format!("{ip},{proto}:{}", plan.port);
            if plan.external.endpoints.is_empty() {
                add(NO_ENDPOINTS, entry.clone());
            }
            if plan.load_balancer_ips.contains(ip) {
                add(LOAD_BALANCER, entry.clone());
                if plan.external_local {
                    add(LOAD_BALANCER_LOCAL, entry.clone());
                }
                let ranges: Vec<_> = plan
                    .source_ranges
                    .iter()
                    .filter(|r| IpFamily::of(r.ip()) == family)
                    .collect();
                if !plan.source_ranges.is_empty() {
                    add(LOAD_BALANCER_FW, entry.clone());
                    for range in ranges {
                        // As `ipset save` prints it: a single address without /32.
                        let net = if range.prefix() == host_prefix(&range.ip()) {
                            range.ip().to_string()
                        } else {
                            format!("{}/{}", range.network(), range.prefix())
                        };
                        add(LOAD_BALANCER_SOURCE_CIDR, format!("{entry},{net}"));
                    }
                }
            } else if plan.external_local {
                add(EXTERNAL_IP_LOCAL, entry);
            } else {
                add(EXTERNAL_IP, entry);
            }
        }
        if let Some(node_port) = plan.node_port {
            for ip in nodeport_ips {
                virtual_service(*ip, node_port, &plan.external.endpoints);
            }
            match plan.protocol {
                Protocol::Tcp | Protocol::Udp => {
                    let (all, local) = if plan.protocol == Protocol::Tcp {
                        (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP)
                    } else {
                        (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP)
                    };
                    add(all, node_port.to_string());
                    if plan.external_local {
                        add(local, node_port.to_string());
                    }
                }
                Protocol::Sctp => {
                    for ip in nodeport_ips {
                        let entry = format!("{ip},sctp:{node_port}");
                        add(NODE_PORT_SCTP, entry.clone());
                        if plan.external_local {
                            add(NODE_PORT_LOCAL_SCTP, entry);
                        }
                    }
                }
            }
        }
        for ep in plan.all_endpoints() {
            add(
                LOOP_BACK,
                format!("{},{proto}:{},{}", ep.ip(), ep.port(), ep.ip()),
            );
        }
    }
    // One Service's ports may share an address (and its IPVS-IPS entry): once each.
    addresses.sort_unstable();
    addresses.dedup();
    for ip in &addresses {
        add(IPVS_IPS, ip.to_string());
    }
    out.entries.sort_unstable();
    out.entries.dedup();
    out.services = services.iter().map(|(id, _)| *id).collect();
    out.addresses = addresses;
    (out, services)
}

/// The rules: fixed (the sets carry the Services), so a Service change writes none.
fn ruleset(family: IpFamily) -> Ruleset {
    let mark = format!("{MASQUERADE_MARK:#x}");
    let set = |name: &str| set_name(name, family);
    let mut r = Ruleset::new(family);
    let match_set = |name: &str, dirs: &str| format!("-m set --match-set {} {dirs}", set(name));
    let nat = r.table("nat");
    nat.chains.insert(
        "KUBE-SERVICES".into(),
        vec![
            // Traffic to a ClusterIP from anything but a local pod (the node itself, a
            // packet routed in) is masqueraded, so replies come back through this node.
            format!(
                "! -i {POD_INTERFACES} -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" {} -j KUBE-MARK-MASQ",
                match_set(CLUSTER_IP, "dst,dst")
            ),
            format!(
                "-m comment --comment \"Kubernetes service lb portal\" {} -j KUBE-LOAD-BALANCER",
                match_set(LOAD_BALANCER, "dst,dst")
            ),
            format!(
                "-m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" {} -j KUBE-MARK-MASQ",
                match_set(EXTERNAL_IP, "dst,dst")
            ),
            format!(
                "-m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" {} -j ACCEPT",
                match_set(EXTERNAL_IP, "dst,dst")
            ),
            format!(
                "-m comment --comment \"Kubernetes service external ip + port with externalTrafficPolicy=local\" {} -j ACCEPT",
                match_set(EXTERNAL_IP_LOCAL, "dst,dst")
            ),
            "-m addrtype --dst-type LOCAL -j KUBE-NODE-PORT".into(),
            format!("{} -j ACCEPT", match_set(CLUSTER_IP, "dst,dst")),
            format!("{} -j ACCEPT", match_set(LOAD_BALANCER, "dst,dst")),
        ],
    );
    nat.chains.insert(
        "KUBE-LOAD-BALANCER".into(),
        vec![
            format!(
                "-m comment --comment \"Kubernetes service load balancer ip + port with externalTrafficPolicy=local\" {} -j RETURN",
                match_set(LOAD_BALANCER_LOCAL, "dst,dst")
            ),
            "-j KUBE-MARK-MASQ".into(),
        ],
    );
    let mut node_port = Vec::new();
    for (proto, all, local) in [
        ("tcp", NODE_PORT_TCP, NODE_PORT_LOCAL_TCP),
        ("udp", NODE_PORT_UDP, NODE_PORT_LOCAL_UDP),
    ] {
        node_port.push(format!(
            "-p {proto} -m comment --comment \"Kubernetes nodeport {} port with externalTrafficPolicy=local\" {} -j RETURN",
            proto.to_uppercase(),
            match_set(local, "dst")
        ));
        node_port.push(format!(
            "-p {proto} -m comment --comment \"Kubernetes nodeport {} port for masquerade purpose\" {} -j KUBE-MARK-MASQ",
            proto.to_uppercase(),
            match_set(all, "dst")
        ));
    }
    node_port.push(format!(
        "-p sctp {} -j RETURN",
        match_set(NODE_PORT_LOCAL_SCTP, "dst,dst")
    ));
    node_port.push(format!(
        "-p sctp {} -j KUBE-MARK-MASQ",
        match_set(NODE_PORT_SCTP, "dst,dst")
    ));
    nat.chains.insert("KUBE-NODE-PORT".into(), node_port);
    nat.chains
        .insert("KUBE-MARK-MASQ".into(), vec![super::iptables::mark_rule()]);
    // Hairpin first: a pod reaching itself through its Service must not see its own
    // address as the source (dropped as a martian).
    let mut postrouting = vec![format!(
        "-m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose\" {} -j MASQUERADE",
        match_set(LOOP_BACK, "dst,dst,src")
    )];
    postrouting.extend(super::iptables::masquerade_marked_rules());
    nat.chains.insert("KUBE-POSTROUTING".into(), postrouting);
    let jump = |from: &str, comment: &str, to: &str| {
        Jump::new(from, format!("-m comment --comment \"{comment}\" -j {to}"))
    };
    nat.jumps = vec![
        jump("PREROUTING", "kubernetes service portals", "KUBE-SERVICES"),
        jump("OUTPUT", "kubernetes service portals", "KUBE-SERVICES"),
        jump(
            "POSTROUTING",
            "kubernetes postrouting rules",
            "KUBE-POSTROUTING",
        ),
    ];
    let filter = r.table("filter");
    filter.chains.insert(
        "KUBE-FORWARD".into(),
        vec![
            format!("-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"),
            "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
        ],
    );
    filter.chains.insert(
        "KUBE-NODE-PORT".into(),
        vec![format!(
            "-m comment --comment \"Kubernetes health check node port\" {} -j ACCEPT",
            match_set(HEALTH_CHECK_NODE_PORT, "dst")
        )],
    );
    filter.chains.insert(
        "KUBE-PROXY-FIREWALL".into(),
        vec![format!(
            "-m comment --comment \"Kubernetes service load balancer ip + port for load balancer with sourceRange\" {} -j KUBE-SOURCE-RANGES-FIREWALL",
            match_set(LOAD_BALANCER_FW, "dst,dst")
        )],
    );
    filter.chains.insert(
        "KUBE-SOURCE-RANGES-FIREWALL".into(),
        vec![
            format!(
                "{} -j RETURN",
                match_set(LOAD_BALANCER_SOURCE_CIDR, "dst,dst,src")
            ),
            "-j DROP".into(),
        ],
    );
    // Host services are not reachable on Service addresses (kubernetes#72236): a new
    // connection to a kube-ipvs0 address that is no Service port is refused.
    let reject = match family {
        IpFamily::V4 => "icmp-port-unreachable",
        IpFamily::V6 => "icmp6-port-unreachable",
    };
    // A Service port without endpoints: refused at once (TCP with a reset), as in the
    // other modes.
    let mut ipvs_filter = vec![
        format!(
            "-p tcp -m comment --comment \"Service port without endpoints\" {} -j REJECT --reject-with tcp-reset",
            match_set(NO_ENDPOINTS, "dst,dst")
        ),
        format!(
            "-m comment --comment \"Service port without endpoints\" {} -j REJECT --reject-with {reject}",
            match_set(NO_ENDPOINTS, "dst,dst")
        ),
    ];
    ipvs_filter.extend(
        [LOAD_BALANCER, CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL]
            .iter()
            .map(|s| format!("{} -j RETURN", match_set(s, "dst,dst"))),
    );
    ipvs_filter.push(format!(
        "{} -j RETURN",
        match_set(HEALTH_CHECK_NODE_PORT, "dst")
    ));
    ipvs_filter.push(format!(
        "-m conntrack --ctstate NEW {} -j REJECT --reject-with {reject}",
        match_set(IPVS_IPS, "dst")
    ));
    filter.chains.insert("KUBE-IPVS-FILTER".into(), ipvs_filter);
    filter.jumps = vec![
        jump("INPUT", "kubernetes ipvs access filter", "KUBE-IPVS-FILTER"),
        jump("INPUT", "kube-proxy firewall rules", "KUBE-PROXY-FIREWALL"),
        jump("INPUT", "kubernetes health check rules", "KUBE-NODE-PORT"),
        jump(
            "FORWARD",
            "kube-proxy firewall rules",
            "KUBE-PROXY-FIREWALL",
        ),
        jump("FORWARD", "kubernetes forwarding rules", "KUBE-FORWARD"),
    ];
    // First in their chains: a blanket ACCEPT above them would open host ports on
    // Service addresses and bypass loadBalancerSourceRanges.
    for j in &mut filter.jumps {
        j.first = true;
    }
    r
}

/// kube-ipvs0 and its addresses, and the node's own addresses.
pub trait Addresses: Send + Sync {
    /// kube-ipvs0's addresses; None when there is no kube-ipvs0.
    fn held(&self) -> anyhow::Result<Option<BTreeSet<IpAddr>>>;
    fn create_device(&self) -> anyhow::Result<()>;
    /// Adds addresses to kube-ipvs0 (all of them: one that fails is named, the others
    /// are still added).
    fn add(&self, ips: &[IpAddr]) -> anyhow::Result<()>;
    /// Removes addresses from kube-ipvs0; one already gone is fine.
    fn remove(&self, ips: &[IpAddr]) -> anyhow::Result<()>;
    /// The node's addresses inside `cidrs` (not loopback, not IPv6 link-local, not
    /// kube-ipvs0's).
    fn node_ips(&self, cidrs: &[ipnetwork::IpNetwork]) -> anyhow::Result<Vec<IpAddr>>;
    fn remove_device(&self) -> anyhow::Result<()>;
}

/// The kernel's links, through the dataplane's netlink handle.
pub struct KernelAddresses;

/// Address requests sent before waiting for their answers.
const ADDRESS_REQUESTS_IN_FLIGHT: usize = 64;

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => tokio::task::block_in_place(|| handle.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f),
    }
}

fn host_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

impl Addresses for KernelAddresses {
    fn held(&self) -> anyhow::Result<Option<BTreeSet<IpAddr>>> {
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            let Some(link) = nl.link_by_name(DUMMY).await? else {
                return Ok(None);
            };
            Ok(Some(
                nl.addresses(&link)
                    .await?
                    .into_iter()
                    .map(|(ip, _)| ip)
                    .collect(),
            ))
        })
    }

    fn create_device(&self) -> anyhow::Result<()> {
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            nl.create_dummy(DUMMY).await?;
            Ok(())
        })
    }

    fn add(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            let link = nl
                .link_by_name(DUMMY)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{DUMMY} is missing"))?;
            // One connection, many requests in flight: 10,000 addresses one at a time
            // cost a round trip each.
            let results: Vec<_> = futures::stream::iter(ips)
                .map(|ip| nl.add_address(&link, *ip, host_prefix(ip), true))
                .buffer_unordered(ADDRESS_REQUESTS_IN_FLIGHT)
                .collect()
                .await;
            results.into_iter().find(Result::is_err).unwrap_or(Ok(()))?;
            Ok(())
        })
    }

    fn remove(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            let Some(link) = nl.link_by_name(DUMMY).await? else {
                return Ok(());
            };
            let results: Vec<_> = futures::stream::iter(ips)
                .map(|ip| nl.delete_address(&link, *ip, host_prefix(ip)))
                .buffer_unordered(ADDRESS_REQUESTS_IN_FLIGHT)
                .collect()
                .await;
            for result in results {
                if let Err(e) = result {
                    if !e.is_not_found() {
                        return Err(e.into());
                    }
                }
            }
            Ok(())
        })
    }

    fn node_ips(&self, cidrs: &[ipnetwork::IpNetwork]) -> anyhow::Result<Vec<IpAddr>> {
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            let dummy = nl.link_by_name(DUMMY).await?.map(|l| l.index);
            let mut out: Vec<IpAddr> = nl
                .all_addresses()
                .await?
                .into_iter()
                .filter(|(index, ip, _)| {
                    Some(*index) != dummy
                        && !ip.is_loopback()
                        && !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
                        && cidrs.iter().any(|c| c.contains(*ip))
                })
                .map(|(_, ip, _)| ip)
                .collect();
            out.sort();
            out.dedup();
            Ok(out)
        })
    }

    fn remove_device(&self) -> anyhow::Result<()> {
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            if let Some(link) = nl.link_by_name(DUMMY).await? {
                nl.delete_link(&link).await?;
            }
            Ok(())
        })
    }
}

/// The kernel pieces this mode writes, or fakes.
pub struct IpvsBackends {
    pub ipvs: Box<dyn ipvs::Backend>,
    pub ipset: Box<dyn ipset::Backend>,
    pub addresses: Box<dyn Addresses>,
}

/// Keeps IPVS, the sets and kube-ipvs0's addresses as wanted, per family; drains real
/// servers that go away.
pub struct IpvsSync {
    /// What the kernel held after the last write (None: read it again).
    services: Option<Services>,
    sets: [IpsetSync; 2],
    /// Both families' sets, read with one `ipset save` (at 10,000 Services it lists
    /// 40,000 entries), each family's taken by its next full sync.
    sets_read: [Option<ipset::HeldSets>; 2],
    addresses: Option<BTreeSet<IpAddr>>,
    /// Real servers being drained, and since when.
    draining: HashMap<(ServiceId, SocketAddr), Instant>,
    pub drain_timeout: Duration,
}

/// Kubernetes' default --service-node-port-range: a virtual service on a node address
/// in it is taken to be a NodePort this mode opened (one whose Service went away).
const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Whether a virtual service is this mode's: one on a Service address (kube-ipvs0),
/// or a NodePort on a node address (one wanted, or one in the NodePort range whose
/// Service went away). Others (fwmark services, another tool's) are never touched.
fn owned(id: &ServiceId, addresses: &BTreeSet<IpAddr>, want: &Desired) -> bool {
    addresses.contains(&id.address.ip())
        || (want.node_ips.contains(&id.address.ip())
            && (want.services.contains_key(id) || NODE_PORT_RANGE.contains(&id.address.port())))
}

/// How much of the wanted state a sync compares with the kernel.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// All of it (`reread`: read the kernel first, not what was last written).
    Full { reread: bool },
    /// What changed: the rest is as the last sync left it.
    Partial(&'a Touched),
}

impl IpvsSync {
    pub fn new(drain_timeout: Duration) -> IpvsSync {
        IpvsSync {
            services: None,
            sets: [IpsetSync::new(owns_set_v4), IpsetSync::new(owns_set_v6)],
            sets_read: [None, None],
            addresses: None,
            draining: HashMap::new(),
            drain_timeout,
        }
    }

    /// Forgets what was written: the next sync reads the kernel (a full sync calls it
    /// once, before either family).
    pub fn forget(&mut self) {
        self.services = None;
        self.addresses = None;
        self.sets_read = [None, None];
    }

    #[cfg(test)]
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    /// Writes `want` (one family's), all of it or what `scope` says changed; returns
    /// how many kernel writes it took. Sets first (the rules match them), then rules,
    /// then addresses and services.
    pub fn sync(
        &mut self,
        backends: &IpvsBackends,
        iptables: &mut calyx_dataplane::firewall::iptables::RulesetSync,
        iptables_backend: &dyn calyx_dataplane::firewall::iptables::Backend,
        want: &Desired,
        scope: Scope,
    ) -> anyhow::Result<usize> {
        let family = want.ruleset.family;
        let in_family = |ip: &IpAddr| IpFamily::of(*ip) == family;
        let mut writes = 0;
        let i = family as usize;
        let t0 = Instant::now();
        let script = match scope {
            // Nothing known (a start) or a re-read asked for: both families' sets are
            // read with the first family's sync.
            Scope::Full { reread } if reread || !self.sets[i].knows_kernel() => {
                if self.sets_read[i].is_none() {
                    tracing::debug!(%family, "reading both families' ipsets");
                    let held = backends.ipset.dump(owns_set)?;
                    let (v4, v6) = held.into_iter().partition(|(name, _)| owns_set_v4(name));
                    self.sets_read = [Some(v4), Some(v6)];
                }
                let held = self.sets_read[i].take().expect("read above");
                self.sets[i].start_from(held);
                self.sets[i].sync(backends.ipset.as_ref(), &want.sets, false)?
            }
            Scope::Full { .. } => self.sets[i].sync(backends.ipset.as_ref(), &want.sets, false)?,
            Scope::Partial(touched) => {
                let entries = touched
                    .entries
                    .iter()
                    .map(|(set, entry)| (want.sets[*set].name.as_str(), entry.as_str()));
                self.sets[i].sync_entries(backends.ipset.as_ref(), &want.sets, entries)?
            }
        };
        writes += script.lines().count();
        let t_sets = t0.elapsed();
        // The rules are fixed (the sets carry the Services): only a full sync looks.
        if let Scope::Full { reread } = scope {
            let tx = iptables.sync(iptables_backend, &want.ruleset, reread)?;
            writes += tx.tables.iter().map(|(_, ops)| ops.len()).sum::<usize>();
        }
        let t_rules = t0.elapsed();

        // Addresses and virtual services: both families' are read together, once per
        // full sync (the caller's `forget`); at 10,000 Services a read is 10,001
        // requests.
        if self.addresses.is_none() {
            let held = match backends.addresses.held()? {
                Some(held) => held,
                None => {
                    backends.addresses.create_device()?;
                    BTreeSet::new()
                }
            };
            self.addresses = Some(held);
        }
        let held = self.addresses.as_mut().expect("read above");
        let missing: Vec<IpAddr> = match scope {
            Scope::Full { .. } => want
                .addresses
                .difference(held)
                .filter(|ip| in_family(ip))
                .copied()
                .collect(),
            Scope::Partial(touched) => touched
                .addresses
                .iter()
                .filter(|ip| want.addresses.contains(ip) && !held.contains(ip))
                .copied()
                .collect(),
        };
        if let Err(e) = backends.addresses.add(&missing) {
            self.addresses = None; // Some may have been added: read them again.
            return Err(e);
        }
        held.extend(&missing);
        writes += missing.len();
        let t_addresses = t0.elapsed();

        if self.services.is_none() {
            self.services = Some(backends.ipvs.dump()?);
        }
        let current = self.services.as_mut().expect("read above");
        let t_dump = t0.elapsed();
        // The services to compare: all of this family's (held or wanted) on a full
        // sync, the changed ones otherwise.
        let ids: BTreeSet<ServiceId> = match scope {
            Scope::Full { .. } => current
                .keys()
                .chain(want.services.keys())
                .filter(|id| in_family(&id.address.ip()))
                .copied()
                .collect(),
            Scope::Partial(touched) => touched.services.clone(),
        };
        // What is ours: services on kube-ipvs0's addresses (as held, so one whose
        // Service went is found), and NodePorts on node addresses. A changed service
        // was or is wanted: ours.
        let addresses = self.addresses.as_ref().expect("read above");
        let is_ours = |id: &ServiceId| match scope {
            Scope::Full { .. } => in_family(&id.address.ip()) && owned(id, addresses, want),
            Scope::Partial(_) => true,
        };
        let mut target: Services = ids
            .iter()
            .filter_map(|id| want.services.get(id).map(|s| (*id, s.clone())))
            .collect();
        let now = Instant::now();
        // Drain: a real server that goes from a service that stays keeps weight 0
        // while it has connections (TCP and SCTP; UDP has no end to wait for).
        let mut drained: Vec<(ServiceId, SocketAddr)> = Vec::new();
        for (id, wanted) in target.iter_mut() {
            let Some(held) = current.get(id) else {
                continue;
            };
            if !is_ours(id) {
                continue;
            }
            for (rs, server) in &held.servers {
                if wanted.servers.contains_key(rs) {
                    self.draining.remove(&(*id, *rs));
                    continue;
                }
                if id.protocol == ipvs::Protocol::Udp {
                    continue;
                }
                // Kept at weight 0 until `sweep`, which reads fresh connection counts,
                // finds it idle (the counts held here may be old), or its time is up.
                let since = *self.draining.entry((*id, *rs)).or_insert(now);
                if now.duration_since(since) < self.drain_timeout {
                    wanted.servers.insert(
                        *rs,
                        RealServer {
                            weight: 0,
                            ..*server
                        },
                    );
                } else {
                    drained.push((*id, *rs));
                }
            }
        }
        for key in drained {
            self.draining.remove(&key);
        }
        // A service that goes takes its draining servers with it.
        self.draining
            .retain(|(id, _), _| !ids.contains(id) || target.contains_key(id));
        let ops = ipvs::plan_only(&ids, current, &target, is_ours);
        let t_plan = t0.elapsed();
        if !ops.is_empty() {
            let result = backends.ipvs.apply(&ops);
            ipvs::apply_to(current, &ops);
            if let Err(e) = result {
                self.services = None;
                return Err(e.into());
            }
            writes += ops.len();
        }

        // Addresses last: a Service address goes after its virtual services.
        let held = self.addresses.as_mut().expect("read above");
        let stale: Vec<IpAddr> = match scope {
            Scope::Full { .. } => held
                .iter()
                .filter(|ip| in_family(ip) && !want.addresses.contains(ip))
                .copied()
                .collect(),
            Scope::Partial(touched) => touched
                .addresses
                .iter()
                .filter(|ip| held.contains(ip) && !want.addresses.contains(ip))
                .copied()
                .collect(),
        };
        if let Err(e) = backends.addresses.remove(&stale) {
            self.addresses = None;
            return Err(e);
        }
        for ip in &stale {
            held.remove(ip);
        }
        writes += stale.len();
        tracing::debug!(%family, sets = ?t_sets, rules = ?t_rules, addresses = ?t_addresses, dump = ?t_dump, plan = ?t_plan, services = ?t0.elapsed(), ops = ops.len(), "ipvs sync phases (cumulative)");
        Ok(writes)
    }

    /// Reads the connection counts of the servers being drained (only their services)
    /// and removes those that have none left (or whose time is up). Returns how many
    /// were removed.
    pub fn sweep(&mut self, backends: &IpvsBackends) -> anyhow::Result<usize> {
        if self.draining.is_empty() {
            return Ok(0);
        }
        let services: BTreeSet<ServiceId> = self.draining.keys().map(|(id, _)| *id).collect();
        let mut held = BTreeMap::new();
        for id in services {
            held.insert(id, backends.ipvs.servers(&id)?);
        }
        let now = Instant::now();
        let mut ops = Vec::new();
        self.draining.retain(|(id, rs), since| {
            let Some(server) = held.get(id).and_then(|s| s.get(rs)) else {
                return false;
            };
            if server.weight > 0 {
                return false; // Wanted again.
            }
            let done = server.active + server.inactive == 0
                || now.duration_since(*since) >= self.drain_timeout;
            if done {
                ops.push(ipvs::Op::DeleteServer(*id, *rs));
            }
            !done
        });
        if !ops.is_empty() {
            let result = backends.ipvs.apply(&ops);
            if let Some(services) = self.services.as_mut() {
                ipvs::apply_to(services, &ops);
            }
            result?;
            tracing::info!(removed = ops.len(), "drained real servers removed");
        }
        Ok(ops.len())
    }
}

/// The IPVS sysctls kube-proxy sets: connection tracking for IPVS traffic (without it
/// hairpin and cross-node NodePorts break: MASQUERADE never sees them), dropping
/// connections to removed servers, and conn_reuse_mode as kube-proxy picks it per
/// kernel (kubernetes#70747, #93297: 0 below 5.9, where 1 stalls reused ports for a
/// second; left at 1 from 5.9 on).
pub fn sysctls(kernel_release: &str) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
        ("net/ipv4/ip_forward", "1"),
    ];
    let mut parts = kernel_release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version >= (4, 1) {
        out.push((
            "net/ipv4/vs/conn_reuse_mode",
            if version < (5, 9) { "0" } else { "1" },
        ));
    }
    out
}

/// Removes everything this mode made: its virtual services (those on kube-ipvs0
/// addresses, and NodePorts in `node_ports` on node addresses), rules, sets, and
/// kube-ipvs0. Parts that are missing are skipped; each failure is logged.
pub fn remove_all(
    backends: &IpvsBackends,
    iptables_backend: &dyn calyx_dataplane::firewall::iptables::Backend,
    keep_shared_chains: bool,
) {
    let addresses = match backends.addresses.held() {
        Ok(a) => a.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read {DUMMY}");
            BTreeSet::new()
        }
    };
    if let Ok(current) = backends.ipvs.dump() {
        let ops: Vec<ipvs::Op> = current
            .keys()
            .filter(|id| addresses.contains(&id.address.ip()))
            .map(|id| ipvs::Op::DeleteService(*id))
            .collect();
        if !ops.is_empty() {
            match backends.ipvs.apply(&ops) {
                Ok(()) => tracing::info!(services = ops.len(), "removed the IPVS virtual services"),
                Err(e) => tracing::warn!(error = %e, "could not remove the IPVS virtual services"),
            }
        }
    }
    let owner = if keep_shared_chains {
        Ownership {
            exact: IPVS_ONLY_CHAINS.to_vec(),
            prefixes: vec![],
        }
    } else {
        ownership()
    };
    for family in IpFamily::BOTH {
        let mut sync = calyx_dataplane::firewall::iptables::RulesetSync::new(owner.clone());
        if let Err(e) = sync.sync(iptables_backend, &Ruleset::new(family), true) {
            tracing::warn!(%family, error = %e, "could not remove the IPVS mode's chains");
        }
    }
    let mut sets = IpsetSync::new(owns_set);
    if let Err(e) = sets.sync(backends.ipset.as_ref(), &[], true) {
        tracing::warn!(error = %e, "could not remove the IPVS mode's ipsets");
    }
    if let Err(e) = backends.addresses.remove_device() {
        tracing::warn!(error = %e, "could not remove {DUMMY}");
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::proxy::model::port_plans;
    use crate::proxy::model::tests::{endpoint, service, slice, state};
    use calyx_dataplane::firewall::ipset::RecordingIpset;
    use calyx_dataplane::firewall::iptables::{RecordingIptables, RulesetSync};
    use calyx_dataplane::ipvs::RecordingIpvs;
    use std::sync::{Arc, Mutex};

    /// kube-ipvs0 as data; node address 192.0.2.11.
    #[derive(Default)]
    pub struct FakeAddresses(pub Mutex<Option<BTreeSet<IpAddr>>>);

    impl Addresses for Arc<FakeAddresses> {
        fn held(&self) -> anyhow::Result<Option<BTreeSet<IpAddr>>> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn create_device(&self) -> anyhow::Result<()> {
            *self.0.lock().unwrap() = Some(BTreeSet::new());
            Ok(())
        }
        fn add(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
            self.0.lock().unwrap().as_mut().unwrap().extend(ips);
            Ok(())
        }
        fn remove(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
            let mut held = self.0.lock().unwrap();
            for ip in ips {
                held.as_mut().unwrap().remove(ip);
            }
            Ok(())
        }
        fn node_ips(&self, _: &[ipnetwork::IpNetwork]) -> anyhow::Result<Vec<IpAddr>> {
            Ok(vec!["192.0.2.11".parse().unwrap()])
        }
        fn remove_device(&self) -> anyhow::Result<()> {
            *self.0.lock().unwrap() = None;
            Ok(())
        }
    }

    const NODE_IPS: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 11))];

    fn node() -> Node<'static> {
        Node {
            nodeport_ips: &NODE_IPS,
            health_check_ports: &[],
            default_scheduler: "rr",
        }
    }

    fn web_state(endpoints: &[&str]) -> crate::proxy::model::ProxyState {
        let mut svc = service("web", "10.96.0.10", 80);
        svc.ports[0].node_port = Some(30080);
        svc.ipvs_scheduler = Some("mh".into());
        state(
            vec![svc],
            vec![slice(
                "web",
                8080,
                endpoints.iter().map(|ip| endpoint(ip, "n1")).collect(),
            )],
        )
    }

    fn id(s: &str) -> ServiceId {
        ServiceId {
            address: s.parse().unwrap(),
            protocol: ipvs::Protocol::Tcp,
        }
    }

    #[test]
    fn a_service_becomes_virtual_services_addresses_and_set_entries() {
        let plans = port_plans(
            &web_state(&["10.244.1.2", "10.244.2.2"]),
            "n1",
            IpFamily::V4,
        );
        let want = desired(&plans, IpFamily::V4, &node());
        let cluster = &want.services[&id("10.96.0.10:80")];
        assert_eq!(cluster.settings.scheduler, "mh");
        assert_eq!(cluster.servers.len(), 2);
        assert_eq!(want.services[&id("192.0.2.11:30080")].servers.len(), 2);
        assert_eq!(
            want.addresses,
            BTreeSet::from(["10.96.0.10".parse().unwrap()])
        );
        let set = |name: &str| {
            want.sets
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.entries.iter().cloned().collect::<Vec<_>>())
                .unwrap()
        };
        assert_eq!(set("KUBE-CLUSTER-IP"), vec!["10.96.0.10,tcp:80"]);
        assert_eq!(set("KUBE-NODE-PORT-TCP"), vec!["30080"]);
        assert_eq!(set("KUBE-IPVS-IPS"), vec!["10.96.0.10"]);
        assert!(set("CALYX-NO-ENDPOINTS").is_empty());
        assert_eq!(
            set("KUBE-LOOP-BACK"),
            vec![
                "10.244.1.2,tcp:8080,10.244.1.2",
                "10.244.2.2,tcp:8080,10.244.2.2"
            ]
        );
        // IPv6 names as kube-proxy's, within ipset's 31 characters.
        assert_eq!(set_name(CLUSTER_IP, IpFamily::V6), "KUBE-6-CLUSTER-IP");
        assert_eq!(
            set_name(LOAD_BALANCER_SOURCE_CIDR, IpFamily::V6),
            "KUBE-6-LOAD-BALANCER-SOURCE-CID"
        );
        // A LoadBalancer with source ranges, one of them a single address, spelled as
        // `ipset save` prints it (no /32), so a restart finds nothing to change.
        let mut st = web_state(&[]);
        let key = st.services.keys().next().unwrap().clone();
        let mut svc = (*st.services[&key]).clone();
        svc.load_balancer_ips = vec!["198.51.100.201".parse().unwrap()];
        svc.load_balancer_source_ranges = vec![
            "192.0.2.0/24".parse().unwrap(),
            "192.0.2.100/32".parse().unwrap(),
        ];
        st.services.insert(key, std::sync::Arc::new(svc));
        let lb = desired(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &node());
        let lb_set = |name: &str| {
            lb.sets
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.entries.iter().cloned().collect::<Vec<_>>())
                .unwrap()
        };
        assert_eq!(
            lb_set("KUBE-LOAD-BALANCER-SOURCE-CIDR"),
            vec![
                "198.51.100.201,tcp:80,192.0.2.0/24",
                "198.51.100.201,tcp:80,192.0.2.100"
            ]
        );
        assert_eq!(
            lb_set("KUBE-LOAD-BALANCER-FW"),
            vec!["198.51.100.201,tcp:80"]
        );
        assert_eq!(
            lb_set("CALYX-NO-ENDPOINTS"),
            vec!["10.96.0.10,tcp:80", "198.51.100.201,tcp:80"]
        );
        assert!(SETS
            .iter()
            .all(|(n, _)| set_name(n, IpFamily::V6).len() <= 31));
        assert_eq!(set_name(NO_ENDPOINTS, IpFamily::V6), "CALYX-6-NO-ENDPOINTS");
    }

    #[test]
    fn a_removed_server_drains_and_goes_once_its_connections_end() {
        let ipvs_fake = Arc::new(RecordingIpvs::new());
        struct Shared(Arc<RecordingIpvs>);
        impl ipvs::Backend for Shared {
            fn dump(&self) -> ipvs::Result<Services> {
                self.0.dump()
            }
            fn apply(&self, ops: &[ipvs::Op]) -> ipvs::Result<()> {
                self.0.apply(ops)
            }
        }
        let addresses = Arc::new(FakeAddresses::default());
        let backends = IpvsBackends {
            ipvs: Box::new(Shared(ipvs_fake.clone())),
            ipset: Box::new(RecordingIpset::new()),
            addresses: Box::new(addresses.clone()),
        };
        let iptables = RecordingIptables::new();
        let mut rules = RulesetSync::new(ownership());
        let mut sync = IpvsSync::new(Duration::from_secs(600));
        let mut run = |sync: &mut IpvsSync, endpoints: &[&str], reread: bool| {
            let plans = port_plans(&web_state(endpoints), "n1", IpFamily::V4);
            let want = desired(&plans, IpFamily::V4, &node());
            sync.sync(
                &backends,
                &mut rules,
                &iptables,
                &want,
                Scope::Full { reread },
            )
            .unwrap()
        };
        let vip = id("10.96.0.10:80");
        let b2: SocketAddr = "10.244.2.2:8080".parse().unwrap();
        assert!(run(&mut sync, &["10.244.1.2", "10.244.2.2"], true) > 0);
        assert_eq!(addresses.held().unwrap().unwrap().len(), 1);
        ipvs_fake.set_connections(&vip, &b2, 1, 0);
        run(&mut sync, &["10.244.1.2"], false);
        let held = ipvs_fake.services();
        assert_eq!(held[&vip].servers[&b2].weight, 0, "drained, not cut");
        assert_eq!(sync.draining(), 2, "the ClusterIP's and the NodePort's");
        // Nothing changed: nothing written, the server stays.
        ipvs_fake.take_written();
        run(&mut sync, &["10.244.1.2"], false);
        assert!(ipvs_fake.take_written().is_empty());
        // A restarted agent finds it at weight 0 and keeps draining it.
        let mut restarted = IpvsSync::new(Duration::from_secs(600));
        run(&mut restarted, &["10.244.1.2"], true);
        assert!(ipvs_fake.services()[&vip].servers.contains_key(&b2));
        // Its connection ends: the next look removes it (the NodePort's had none).
        ipvs_fake.set_connections(&vip, &b2, 0, 0);
        assert_eq!(restarted.sweep(&backends).unwrap(), 2);
        assert!(!ipvs_fake.services()[&vip].servers.contains_key(&b2));
        // The Service goes: its virtual services and address go at once.
        let plans: Vec<PortPlan> = Vec::new();
        let want = desired(&plans, IpFamily::V4, &node());
        restarted
            .sync(
                &backends,
                &mut rules,
                &iptables,
                &want,
                Scope::Full { reread: false },
            )
            .unwrap();
        assert!(ipvs_fake.services().is_empty());
        assert!(addresses.held().unwrap().unwrap().is_empty());
    }

    #[test]
    fn foreign_virtual_services_are_never_touched() {
        let fake = RecordingIpvs::new();
        let foreign = id("192.0.2.11:8080");
        ipvs::Backend::apply(
            &fake,
            &[ipvs::Op::AddService(
                foreign,
                ServiceSettings {
                    scheduler: "wrr".into(),
                    persistence: None,
                    scheduler_flags: 0,
                },
            )],
        )
        .unwrap();
        let backends = IpvsBackends {
            ipvs: Box::new(fake),
            ipset: Box::new(RecordingIpset::new()),
            addresses: Box::new(Arc::new(FakeAddresses::default())),
        };
        let mut sync = IpvsSync::new(Duration::from_secs(600));
        let want = desired(&[], IpFamily::V4, &node());
        sync.sync(
            &backends,
            &mut RulesetSync::new(ownership()),
            &RecordingIptables::new(),
            &want,
            Scope::Full { reread: true },
        )
        .unwrap();
        assert!(backends.ipvs.dump().unwrap().contains_key(&foreign));
    }

    #[test]
    fn conn_reuse_mode_follows_the_kernel_as_kube_proxy_sets_it() {
        let reuse = |release| {
            sysctls(release)
                .into_iter()
                .find(|(k, _)| *k == "net/ipv4/vs/conn_reuse_mode")
                .map(|(_, v)| v)
        };
        assert_eq!(reuse("4.0.9"), None);
        assert_eq!(reuse("5.4.0-150-generic"), Some("0"));
        assert_eq!(reuse("6.1.0-57-amd64"), Some("1"));
        assert!(sysctls("6.1.0").contains(&("net/ipv4/vs/conntrack", "1")));
    }
}
