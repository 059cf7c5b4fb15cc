//! IPVS mode's wanted state as data: virtual services, kube-ipvs0's addresses and
//! kube-proxy's ipsets, per family, kept across changes by an `IpvsAssembler`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use calyx_dataplane::firewall::ipset::SetSpec;
use calyx_dataplane::firewall::iptables::Ruleset;
use calyx_dataplane::firewall::IpFamily;
use calyx_dataplane::ipvs::{
    self, RealServer, ServiceId, ServiceSettings, Services, VirtualService,
};

use super::rules::ruleset;
use crate::proxy::model::{PortPlan, Protocol, ServiceKey};

/// kube-proxy's set names; IPv6 ones have `KUBE-6-` for `KUBE-`.
pub(super) const CLUSTER_IP: &str = "KUBE-CLUSTER-IP";
pub(super) const LOOP_BACK: &str = "KUBE-LOOP-BACK";
pub(super) const EXTERNAL_IP: &str = "KUBE-EXTERNAL-IP";
pub(super) const EXTERNAL_IP_LOCAL: &str = "KUBE-EXTERNAL-IP-LOCAL";
pub(super) const LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
pub(super) const LOAD_BALANCER_LOCAL: &str = "KUBE-LOAD-BALANCER-LOCAL";
pub(super) const LOAD_BALANCER_FW: &str = "KUBE-LOAD-BALANCER-FW";
pub(super) const LOAD_BALANCER_SOURCE_CIDR: &str = "KUBE-LOAD-BALANCER-SOURCE-CIDR";
pub(super) const NODE_PORT_TCP: &str = "KUBE-NODE-PORT-TCP";
pub(super) const NODE_PORT_LOCAL_TCP: &str = "KUBE-NODE-PORT-LOCAL-TCP";
pub(super) const NODE_PORT_UDP: &str = "KUBE-NODE-PORT-UDP";
pub(super) const NODE_PORT_LOCAL_UDP: &str = "KUBE-NODE-PORT-LOCAL-UDP";
pub(super) const NODE_PORT_SCTP: &str = "KUBE-NODE-PORT-SCTP-HASH";
pub(super) const NODE_PORT_LOCAL_SCTP: &str = "KUBE-NODE-PORT-LOCAL-SCTP-HASH";
pub(super) const HEALTH_CHECK_NODE_PORT: &str = "KUBE-HEALTH-CHECK-NODE-PORT";
pub(super) const IPVS_IPS: &str = "KUBE-IPVS-IPS";
/// Calyx's own: Service ports with no endpoint to reach, refused at once (IPVS's own
/// ICMP error for an empty virtual service does not reach IPv6 clients here).
pub(super) const NO_ENDPOINTS: &str = "CALYX-NO-ENDPOINTS";

pub const SETS: [(&str, &str); 17] = [
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

pub(super) fn owns_set_v4(name: &str) -> bool {
    SETS.iter().any(|(n, _)| *n == name)
}

pub(super) fn owns_set_v6(name: &str) -> bool {
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

/// The whole wanted state at once (the proxier keeps an `IpvsAssembler` instead).
#[cfg(test)]
pub fn desired(plans: &[PortPlan], family: IpFamily, node: &Node) -> Desired {
    let mut assembler = IpvsAssembler::new(family, node.nodeport_ips, node.default_scheduler);
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
pub struct IpvsTouched {
    pub services: BTreeSet<ServiceId>,
    pub addresses: BTreeSet<IpAddr>,
    pub(super) entries: BTreeSet<Entry>,
}

/// One family's wanted state, kept across changes: a changed Service's share is taken
/// back and its new one added, so a change costs its own size, not the cluster's.
/// Addresses and set entries several Services share are counted; a virtual service two
/// Services claim (one externalIP:port) goes to the first by namespace/name.
pub struct IpvsAssembler {
    family: IpFamily,
    default_scheduler: String,
    shares: HashMap<ServiceKey, Share>,
    claims: HashMap<ServiceId, BTreeMap<ServiceKey, VirtualService>>,
    address_count: HashMap<IpAddr, usize>,
    entry_count: HashMap<Entry, usize>,
    health_check_ports: Vec<u16>,
    desired: Desired,
    touched: IpvsTouched,
}

impl IpvsAssembler {
    pub fn new(
        family: IpFamily,
        nodeport_ips: &[IpAddr],
        default_scheduler: &str,
    ) -> IpvsAssembler {
        IpvsAssembler {
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
            touched: IpvsTouched::default(),
        }
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// What changed since the last call.
    pub fn take_touched(&mut self) -> IpvsTouched {
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
                        let net = if range.prefix() == calyx_dataplane::host_prefix(range.ip()) {
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
