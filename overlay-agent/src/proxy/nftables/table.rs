//! nftables mode: one table per family (`calyx-proxy`), laid out so that its size in
//! chains does not grow with the number of Services (the `nft` tool's cost grows
//! superlinearly with chains; see ../shared/notes/service-proxy-facts.md):
//!
//! - `service-ips` maps (address . protocol . port) to `goto service-lb-N`, where N is
//!   the Service port's endpoint count; `service-lb-N` DNATs through one map for all
//!   Services with N endpoints, keyed by (address . protocol . port . numgen mod N).
//!   NodePorts do the same keyed by (protocol . port).
//! - Only sessionAffinity ClientIP needs chains of its own (kube-proxy's layout: a
//!   chain per endpoint that records the client in a timed set).
//! - Masquerading is decided by set membership before DNAT (traffic to a ClusterIP
//!   that does not come from a local pod, external traffic unless eTP Local), and by
//!   a hairpin set after it. The mark is cleared before MASQUERADE, so no encapsulated
//!   VXLAN packet is ever NATed (projectcalico/calico#3145).
//! - A Service port without usable endpoints is rejected (none at all) or dropped (a
//!   Local policy and none here) in filter chains, for new connections only.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use calyx_dataplane::firewall::nft::{Chain, Hook, Set, SetKind, Table, Touched};
use calyx_dataplane::firewall::IpFamily;
use ipnetwork::IpNetwork;
use sha1::{Digest, Sha1};

use crate::proxy::model::{NoEndpoints, PortPlan, ServiceKey, Targets};
use crate::proxy::node::{NodeSettings, MASQUERADE_MARK, POD_INTERFACES_NFT as POD_INTERFACES};

pub const TABLE: &str = "calyx-proxy";

struct Words {
    ip: &'static str,
    addr_type: &'static str,
    loopback: &'static str,
}

fn words(family: IpFamily) -> Words {
    match family {
        IpFamily::V4 => Words {
            ip: "ip",
            addr_type: "ipv4_addr",
            loopback: "127.0.0.0/8",
        },
        IpFamily::V6 => Words {
            ip: "ip6",
            addr_type: "ipv6_addr",
            loopback: "::1",
        },
    }
}

/// An address or prefix as nft prints it back (a full-length prefix is an address).
fn prefix_text(net: &IpNetwork) -> String {
    if net.prefix() == if net.is_ipv4() { 32 } else { 128 } {
        net.ip().to_string()
    } else {
        format!("{}/{}", net.network(), net.prefix())
    }
}

fn endpoint_text(ep: &SocketAddr) -> String {
    format!("{} . {}", ep.ip(), ep.port())
}

fn short_id(text: &str, len: usize) -> String {
    let mut hex = hex::encode(Sha1::digest(text.as_bytes()));
    hex.truncate(len);
    hex
}

/// One Service port's share of the table: elements of the shared sets and maps, and
/// the chains and sets it needs (shared ones, like the map of Services with N
/// endpoints, are counted: they go when the last port using them does).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fragment {
    pub sets: Vec<(String, Set)>,
    pub chains: Vec<(String, Chain)>,
    /// (set or map, key, value)
    pub elements: Vec<(String, String, Option<String>)>,
}

impl Fragment {
    fn element(&mut self, set: &str, key: String, value: Option<String>) {
        self.elements.push((set.to_string(), key, value));
    }
}

/// The per-count chain and maps for Services with `n` endpoints.
fn shared_by_count(f: &mut Fragment, ip: &str, n: usize, nodeport: bool) {
    let (chain, map, key) = if nodeport {
        (
            "nodeport-lb",
            "nodeport-endpoints",
            "meta l4proto . th dport".to_string(),
        )
    } else {
        (
            "service-lb",
            "service-endpoints",
            format!("{ip} daddr . meta l4proto . th dport"),
        )
    };
    let map_name = format!("{map}-{n}");
    f.sets.push((
        map_name.clone(),
        Set::new(
            SetKind::Map,
            format!("typeof {key} . numgen random mod {n} : {ip} daddr . th dport;"),
        ),
    ));
    f.chains.push((
        format!("{chain}-{n}"),
        Chain::new(vec![format!(
            "dnat {ip} to {key} . numgen random mod {n} map @{map_name}"
        )]),
    ));
}

/// Where one kind of traffic of a port goes: a verdict for the address and NodePort
/// maps (None: no endpoint), filling the fragment with what that verdict needs.
fn route(
    f: &mut Fragment,
    plan: &PortPlan,
    family: IpFamily,
    kind: &str,
    targets: &Targets,
) -> Option<String> {
    if targets.endpoints.is_empty() {
        return None;
    }
    let Words {
        ip, addr_type: at, ..
    } = words(family);
    let Some(timeout) = plan.affinity_seconds else {
        return Some(format!("goto service-lb-{}", targets.endpoints.len()));
    };
    // Session affinity: kube-proxy's layout, a chain per endpoint that records the
    // client in a timed set, checked first.
    let proto = plan.protocol.name();
    let id = short_id(
        &format!("{}/{}/{kind}/{family}", plan.port_name_string(), proto),
        12,
    );
    let chain = format!("affinity-{id}");
    let mut rules = Vec::new();
    let mut picks = Vec::new();
    for (i, ep) in targets.endpoints.iter().enumerate() {
        let ep_id = short_id(&ep.to_string(), 8);
        let ep_chain = format!("affinity-{id}-{ep_id}");
        let set = format!("aff-{id}-{ep_id}");
        rules.push(format!("{ip} saddr @{set} goto {ep_chain}"));
        picks.push(format!("{i} : goto {ep_chain}"));
        f.sets.push((
            set.clone(),
            Set::new(
                SetKind::Set,
                format!("type {at}; flags dynamic,timeout; timeout {timeout}s;"),
            )
            .dynamic(),
        ));
        let to = match ep {
            SocketAddr::V4(v4) => v4.to_string(),
            SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
        };
        f.chains.push((
            ep_chain,
            Chain::new(vec![
                format!("update @{set} {{ {ip} saddr }}"),
                format!("meta l4proto {proto} dnat {ip} to {to}"),
            ]),
        ));
    }
    rules.push(format!(
        "numgen random mod {} vmap {{ {} }}",
        targets.endpoints.len(),
        picks.join(", ")
    ));
    f.chains.push((chain.clone(), Chain::new(rules)));
    Some(format!("goto {chain}"))
}

/// One Service port's fragment.
pub fn fragment(plan: &PortPlan, family: IpFamily) -> Fragment {
    let ip = words(family).ip;
    let proto = plan.protocol.name();
    let mut f = Fragment::default();
    let verdict_for = |targets: &Targets| match targets.otherwise {
        NoEndpoints::Reject => "goto reject-chain".to_string(),
        NoEndpoints::Drop => "drop".to_string(),
    };
    for ep in plan.all_endpoints() {
        f.element("hairpin", format!("{} . {}", ep.ip(), ep.ip()), None);
    }
    let cluster = route(&mut f, plan, family, "cluster", &plan.cluster);
    let external = route(&mut f, plan, family, "external", &plan.external);
    let by_address =
        |f: &mut Fragment, addr: &IpAddr, targets: &Targets, verdict: &Option<String>| {
            let key = format!("{addr} . {proto} . {}", plan.port);
            match verdict {
                None => f.element("no-endpoint-services", key, Some(verdict_for(targets))),
                Some(v) => {
                    if plan.affinity_seconds.is_none() {
                        let n = targets.endpoints.len();
                        shared_by_count(f, ip, n, false);
                        for (i, ep) in targets.endpoints.iter().enumerate() {
                            f.element(
                                &format!("service-endpoints-{n}"),
                                format!("{key} . {i}"),
                                Some(endpoint_text(ep)),
                            );
                        }
                    }
                    f.element("service-ips", key, Some(v.clone()));
                }
            }
        };
    for addr in &plan.cluster_ips {
        by_address(&mut f, addr, &plan.cluster, &cluster);
        f.element(
            "cluster-masquerade",
            format!("{addr} . {proto} . {}", plan.port),
            None,
        );
    }
    for addr in &plan.external_ips {
        by_address(&mut f, addr, &plan.external, &external);
        if !plan.external_local {
            f.element(
                "external-masquerade",
                format!("{addr} . {proto} . {}", plan.port),
                None,
            );
        }
    }
    if !plan.source_ranges.is_empty() {
        for addr in &plan.load_balancer_ips {
            let key = format!("{addr} . {proto} . {}", plan.port);
            f.element("firewall-ips", key.clone(), None);
            for range in plan
                .source_ranges
                .iter()
                .filter(|r| r.is_ipv4() == addr.is_ipv4())
            {
                f.element(
                    "firewall-allow",
                    format!("{key} . {}", prefix_text(range)),
                    None,
                );
            }
        }
    }
    if let Some(node_port) = plan.node_port {
        let key = format!("{proto} . {node_port}");
        match &external {
            None => f.element(
                "no-endpoint-nodeports",
                key.clone(),
                Some(verdict_for(&plan.external)),
            ),
            Some(v) if plan.affinity_seconds.is_some() => {
                f.element("service-nodeports", key.clone(), Some(v.clone()))
            }
            Some(_) => {
                let n = plan.external.endpoints.len();
                shared_by_count(&mut f, ip, n, true);
                for (i, ep) in plan.external.endpoints.iter().enumerate() {
                    f.element(
                        &format!("nodeport-endpoints-{n}"),
                        format!("{key} . {i}"),
                        Some(endpoint_text(ep)),
                    );
                }
                f.element(
                    "service-nodeports",
                    key.clone(),
                    Some(format!("goto nodeport-lb-{n}")),
                );
            }
        }
        if !plan.external_local {
            f.element("nodeport-masquerade", key, None);
        }
    }
    f
}

/// The table without any Service: base chains, the fixed chains, empty sets and maps,
/// and the node-port addresses.
pub fn skeleton(family: IpFamily, ctx: &NodeSettings) -> Table {
    let w = words(family);
    let ip = w.ip;
    let at = w.addr_type;
    let mut t = Table::new(family, TABLE);
    let key3 = format!("type {at} . inet_proto . inet_service");
    let port_key = "type inet_proto . inet_service";
    let s = &mut t.sets;
    for name in ["service-ips", "no-endpoint-services"] {
        s.insert(
            name.into(),
            Set::new(SetKind::Map, format!("{key3} : verdict;")),
        );
    }
    for name in ["cluster-masquerade", "external-masquerade", "firewall-ips"] {
        s.insert(name.into(), Set::new(SetKind::Set, format!("{key3};")));
    }
    s.insert(
        "firewall-allow".into(),
        Set::new(
            SetKind::Set,
            format!("type {at} . inet_proto . inet_service . {at}; flags interval;"),
        ),
    );
    for name in ["service-nodeports", "no-endpoint-nodeports"] {
        s.insert(
            name.into(),
            Set::new(SetKind::Map, format!("{port_key} : verdict;")),
        );
    }
    s.insert(
        "nodeport-masquerade".into(),
        Set::new(SetKind::Set, format!("{port_key};")),
    );
    s.insert(
        "hairpin".into(),
        Set::new(SetKind::Set, format!("type {at} . {at};")),
    );
    let mut nodeport_ips = Set::new(SetKind::Set, format!("type {at}; flags interval;"));
    // NodePort addresses: never loopback; an address inside another listed prefix is
    // left out (an interval set refuses overlaps).
    let own: Vec<&IpNetwork> = ctx
        .nodeport_addresses
        .iter()
        .filter(|n| IpFamily::of(n.ip()) == family)
        .collect();
    for net in &own {
        let inside_other = own
            .iter()
            .any(|o| o != net && o.prefix() < net.prefix() && o.contains(net.network()));
        if !inside_other {
            nodeport_ips.insert(prefix_text(net), None);
        }
    }
    s.insert("nodeport-ips".into(), nodeport_ips);

    let hook = |kind: &'static str, hook: &'static str, priority: i32| Hook {
        kind,
        hook,
        priority,
    };
    let c = &mut t.chains;
    c.insert(
        "nat-prerouting".into(),
        Chain::base(
            hook("nat", "prerouting", -100),
            vec!["jump services".into()],
        ),
    );
    c.insert(
        "nat-output".into(),
        Chain::base(hook("nat", "output", -100), vec!["jump services".into()]),
    );
    c.insert(
        "nat-postrouting".into(),
        Chain::base(
            hook("nat", "postrouting", 100),
            vec!["jump masquerading".into()],
        ),
    );
    c.insert(
        "filter-prerouting".into(),
        Chain::base(
            hook("filter", "prerouting", -110),
            vec![format!(
                "{ip} daddr . meta l4proto . th dport @firewall-ips {ip} daddr . meta l4proto . th dport . {ip} saddr != @firewall-allow drop"
            )],
        ),
    );
    for (name, h) in [
        ("filter-input", "input"),
        ("filter-forward", "forward"),
        ("filter-output", "output"),
    ] {
        c.insert(
            name.into(),
            Chain::base(
                hook("filter", h, -110),
                vec!["ct state new jump endpoints-check".into()],
            ),
        );
    }
    let loopback = w.loopback;
    c.insert(
        "services".into(),
        Chain::new(vec![
            format!("{ip} daddr . meta l4proto . th dport @cluster-masquerade iifname != \"{POD_INTERFACES}\" jump mark-for-masquerade"),
            format!("{ip} daddr . meta l4proto . th dport @external-masquerade jump mark-for-masquerade"),
            format!("{ip} daddr . meta l4proto . th dport vmap @service-ips"),
            format!("{ip} daddr != {loopback} {ip} daddr @nodeport-ips fib daddr type local jump nodeports"),
        ]),
    );
    c.insert(
        "nodeports".into(),
        Chain::new(vec![
            "meta l4proto . th dport @nodeport-masquerade jump mark-for-masquerade".into(),
            "meta l4proto . th dport vmap @service-nodeports".into(),
        ]),
    );
    c.insert(
        "endpoints-check".into(),
        Chain::new(vec![
            format!("{ip} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
            format!("{ip} daddr != {loopback} {ip} daddr @nodeport-ips fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports"),
        ]),
    );
    c.insert(
        "reject-chain".into(),
        Chain::new(vec![
            "meta l4proto tcp reject with tcp reset".into(),
            "reject".into(),
        ]),
    );
    c.insert(
        "mark-for-masquerade".into(),
        Chain::new(vec![format!(
            "meta mark set meta mark | {MASQUERADE_MARK:#x}"
        )]),
    );
    c.insert(
        "masquerading".into(),
        Chain::new(vec![
            // Hairpin: a pod that reached its own Service and landed on itself.
            format!("ct status dnat {ip} saddr . {ip} daddr @hairpin jump mark-for-masquerade"),
            format!("meta mark & {MASQUERADE_MARK:#x} == 0 return"),
            // Cleared before MASQUERADE: an encapsulated VXLAN packet inherits the
            // inner packet's mark and must never be NATed itself.
            format!("meta mark set meta mark ^ {MASQUERADE_MARK:#x}"),
            "masquerade fully-random".into(),
        ]),
    );
    t
}

/// The table kept as wanted across changes: fragments per Service added and removed,
/// so that a change to one Service costs work for that Service only, and says what
/// it touched. Chains and sets shared by several Services (the per-count maps, the
/// hairpin set's entries for an endpoint of several Services) are reference-counted;
/// every other element belongs to one Service port (keys hold its address and port).
pub struct TableAssembler {
    table: Table,
    /// What each Service put in, to take out again (set names shared, not copied).
    owned: HashMap<ServiceKey, Owned>,
    hairpin_refs: HashMap<String, u32>,
    chain_refs: HashMap<String, u32>,
    set_refs: HashMap<String, u32>,
    names: HashMap<String, Arc<str>>,
}

#[derive(Default)]
struct Owned {
    elements: Vec<(Arc<str>, String)>,
    chains: Vec<String>,
    sets: Vec<String>,
}

/// The one set whose elements several Services may share.
const SHARED_SET: &str = "hairpin";

impl TableAssembler {
    pub fn new(family: IpFamily, ctx: &NodeSettings) -> TableAssembler {
        TableAssembler {
            table: skeleton(family, ctx),
            owned: HashMap::new(),
            hairpin_refs: HashMap::new(),
            chain_refs: HashMap::new(),
            set_refs: HashMap::new(),
            names: HashMap::new(),
        }
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    fn name(&mut self, set: &str) -> Arc<str> {
        if let Some(name) = self.names.get(set) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(set);
        self.names.insert(set.to_string(), name.clone());
        name
    }

    /// Replaces the fragments of `service` (none: it is gone), noting what changed.
    pub fn replace(
        &mut self,
        service: &ServiceKey,
        fragments: Vec<Fragment>,
        touched: &mut Touched,
    ) {
        let old = self.owned.remove(service).unwrap_or_default();
        for (set, key) in old.elements {
            if &*set == SHARED_SET && !release(&mut self.hairpin_refs, &key) {
                continue;
            }
            if let Some(s) = self.table.sets.get_mut(&*set) {
                s.elements.remove(&key);
            }
            touched.elements.insert((set.to_string(), key));
        }
        for name in old.chains {
            if release(&mut self.chain_refs, &name) {
                self.table.chains.remove(&name);
                touched.chains.insert(name);
            }
        }
        for name in old.sets {
            if release(&mut self.set_refs, &name) {
                self.table.sets.remove(&name);
                touched.sets.insert(name);
            }
        }
        let mut owned = Owned::default();
        for new in fragments {
            for (name, set) in new.sets {
                let refs = self.set_refs.entry(name.clone()).or_default();
                *refs += 1;
                if *refs == 1 {
                    self.table.sets.insert(name.clone(), set);
                    touched.sets.insert(name.clone());
                }
                owned.sets.push(name);
            }
            for (name, chain) in new.chains {
                let refs = self.chain_refs.entry(name.clone()).or_default();
                *refs += 1;
                if *refs == 1 {
                    self.table.chains.insert(name.clone(), chain);
                    touched.chains.insert(name.clone());
                }
                owned.chains.push(name);
            }
            for (set, key, value) in new.elements {
                if set == SHARED_SET {
                    *self.hairpin_refs.entry(key.clone()).or_default() += 1;
                }
                if let Some(s) = self.table.sets.get_mut(&set) {
                    s.elements.insert(key.clone(), value);
                }
                touched.elements.insert((set.clone(), key.clone()));
                let name = self.name(&set);
                owned.elements.push((name, key));
            }
        }
        if !owned.elements.is_empty() || !owned.chains.is_empty() || !owned.sets.is_empty() {
            self.owned.insert(service.clone(), owned);
        }
    }
}

/// Drops one reference; true when it was the last.
fn release(refs: &mut HashMap<String, u32>, name: &str) -> bool {
    let Some(count) = refs.get_mut(name) else {
        return false;
    };
    *count -= 1;
    if *count == 0 {
        refs.remove(name);
        true
    } else {
        false
    }
}

/// The whole table for `plans` at once.
#[cfg(test)]
pub fn desired_table(plans: &[PortPlan], family: IpFamily, ctx: &NodeSettings) -> Table {
    let mut by_service: std::collections::BTreeMap<&ServiceKey, Vec<Fragment>> = Default::default();
    for plan in plans {
        by_service
            .entry(&plan.service)
            .or_default()
            .push(fragment(plan, family));
    }
    let mut assembler = TableAssembler::new(family, ctx);
    let mut touched = Touched::default();
    for (service, fragments) in by_service {
        assembler.replace(service, fragments, &mut touched);
    }
    assembler.table
}
