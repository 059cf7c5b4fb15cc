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

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use calyx_dataplane::firewall::nft::{Chain, Hook, Set, SetKind, Table};
use calyx_dataplane::firewall::IpFamily;
use ipnetwork::IpNetwork;
use sha1::{Digest, Sha1};

use super::model::{NoEndpoints, PortPlan, Targets};

pub const TABLE: &str = "calyx-proxy";
pub const MASQUERADE_MARK: u32 = 0x4000;
/// Host-side veths of Calyx pods: traffic from them comes from a local pod.
pub const POD_INTERFACES: &str = "cyx*";

/// What the rules need to know about this node.
#[derive(Debug, Clone)]
pub struct NodeContext {
    pub nodeport_addresses: Vec<IpNetwork>,
}

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

/// Where packets for one (address or NodePort) entry go.
enum Route<'a> {
    /// Through the shared map of Services with N endpoints.
    Shared(&'a [SocketAddr]),
    /// Through a chain of its own (session affinity).
    Affinity(String),
}

/// The chains and sets of session-affinity Service ports (kube-proxy's layout: a
/// chain per endpoint that records the client in a timed set, checked first).
struct Affinity<'t> {
    family: IpFamily,
    chains: &'t mut BTreeMap<String, Chain>,
    sets: &'t mut BTreeMap<String, Set>,
}

impl Affinity<'_> {
    /// The chain or shared map one kind of traffic ("cluster", "external") goes
    /// through; None when it has no endpoint.
    fn route<'p>(
        &mut self,
        plan: &PortPlan,
        kind: &str,
        targets: &'p Targets,
    ) -> Option<Route<'p>> {
        if targets.endpoints.is_empty() {
            return None;
        }
        let Some(timeout) = plan.affinity_seconds else {
            return Some(Route::Shared(&targets.endpoints));
        };
        let Words {
            ip, addr_type: at, ..
        } = words(self.family);
        let family = self.family;
        let proto = plan.protocol.name();
        let id = short_id(
            &format!("{}/{}/{kind}/{family}", plan.port_name_string(), proto),
            12,
        );
        let chain = format!("affinity-{id}");
        if self.chains.contains_key(&chain) {
            return Some(Route::Affinity(chain));
        }
        let mut rules = Vec::new();
        let mut picks = Vec::new();
        for (i, ep) in targets.endpoints.iter().enumerate() {
            let ep_id = short_id(&ep.to_string(), 8);
            let ep_chain = format!("affinity-{id}-{ep_id}");
            let set = format!("aff-{id}-{ep_id}");
            rules.push(format!("{ip} saddr @{set} goto {ep_chain}"));
            picks.push(format!("{i} : goto {ep_chain}"));
            self.sets.insert(
                set.clone(),
                Set::new(
                    SetKind::Set,
                    format!("type {at}; flags dynamic,timeout; timeout {timeout}s;"),
                )
                .dynamic(),
            );
            let to = match ep {
                SocketAddr::V4(v4) => v4.to_string(),
                SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
            };
            self.chains.insert(
                ep_chain,
                Chain::new(vec![
                    format!("update @{set} {{ {ip} saddr }}"),
                    format!("meta l4proto {proto} dnat {ip} to {to}"),
                ]),
            );
        }
        rules.push(format!(
            "numgen random mod {} vmap {{ {} }}",
            targets.endpoints.len(),
            picks.join(", ")
        ));
        self.chains.insert(chain.clone(), Chain::new(rules));
        Some(Route::Affinity(chain))
    }
}

/// The table for one family.
pub fn desired_table(plans: &[PortPlan], family: IpFamily, ctx: &NodeContext) -> Table {
    let w = words(family);
    let ip = w.ip;
    let at = w.addr_type;
    let mut t = Table::new(family, TABLE);
    let key3 = format!("type {at} . inet_proto . inet_service");
    let vmap3 = || Set::new(SetKind::Map, format!("{key3} : verdict;"));
    let set3 = || Set::new(SetKind::Set, format!("{key3};"));
    let mut service_ips = vmap3();
    let mut no_endpoint_services = vmap3();
    let mut cluster_masq = set3();
    let mut external_masq = set3();
    let mut firewall_ips = set3();
    let mut firewall_allow = Set::new(
        SetKind::Set,
        format!("type {at} . inet_proto . inet_service . {at}; flags interval;"),
    );
    let port_key = "type inet_proto . inet_service";
    let mut service_nodeports = Set::new(SetKind::Map, format!("{port_key} : verdict;"));
    let mut no_endpoint_nodeports = Set::new(SetKind::Map, format!("{port_key} : verdict;"));
    let mut nodeport_masq = Set::new(SetKind::Set, format!("{port_key};"));
    let mut hairpin = Set::new(SetKind::Set, format!("type {at} . {at};"));
    let mut nodeport_ips = Set::new(SetKind::Set, format!("type {at}; flags interval;"));
    // Endpoint maps by count: (address-keyed, port-keyed).
    let mut by_count: BTreeMap<usize, (Set, Set)> = BTreeMap::new();
    let mut by_count_entry = |n: usize| {
        by_count.entry(n).or_insert_with(|| {
            (
                Set::new(
                    SetKind::Map,
                    format!("typeof {ip} daddr . meta l4proto . th dport . numgen random mod {n} : {ip} daddr . th dport;"),
                ),
                Set::new(
                    SetKind::Map,
                    format!("typeof meta l4proto . th dport . numgen random mod {n} : {ip} daddr . th dport;"),
                ),
            )
        });
    };
    let mut extra_chains: BTreeMap<String, Chain> = BTreeMap::new();
    let mut extra_sets: BTreeMap<String, Set> = BTreeMap::new();
    let mut nodeport_maps: BTreeMap<usize, Vec<(String, String)>> = BTreeMap::new();
    let mut address_maps: BTreeMap<usize, Vec<(String, String)>> = BTreeMap::new();

    for plan in plans {
        let proto = plan.protocol.name();
        let verdict_for = |targets: &Targets| match targets.otherwise {
            NoEndpoints::Reject => "goto reject-chain".to_string(),
            NoEndpoints::Drop => "drop".to_string(),
        };
        for ep in plan.all_endpoints() {
            hairpin.insert(format!("{} . {}", ep.ip(), ep.ip()), None);
        }
        let mut affinity = Affinity {
            family,
            chains: &mut extra_chains,
            sets: &mut extra_sets,
        };
        let cluster_route = affinity.route(plan, "cluster", &plan.cluster);
        let external_route = affinity.route(plan, "external", &plan.external);

        let mut address_entry = |addr: &IpAddr, targets: &Targets, route: &Option<Route>| {
            let key = format!("{addr} . {proto} . {}", plan.port);
            match route {
                None => no_endpoint_services.insert(key, Some(verdict_for(targets))),
                Some(Route::Affinity(chain)) => {
                    service_ips.insert(key, Some(format!("goto {chain}")))
                }
                Some(Route::Shared(eps)) => {
                    let n = eps.len();
                    service_ips.insert(key.clone(), Some(format!("goto service-lb-{n}")));
                    let list = address_maps.entry(n).or_default();
                    for (i, ep) in eps.iter().enumerate() {
                        list.push((format!("{key} . {i}"), endpoint_text(ep)));
                    }
                }
            }
        };
        for addr in &plan.cluster_ips {
            address_entry(addr, &plan.cluster, &cluster_route);
            cluster_masq.insert(format!("{addr} . {proto} . {}", plan.port), None);
        }
        for addr in &plan.external_ips {
            address_entry(addr, &plan.external, &external_route);
            if !plan.external_local {
                external_masq.insert(format!("{addr} . {proto} . {}", plan.port), None);
            }
        }
        if !plan.source_ranges.is_empty() {
            for addr in &plan.load_balancer_ips {
                let key = format!("{addr} . {proto} . {}", plan.port);
                firewall_ips.insert(key.clone(), None);
                for range in plan
                    .source_ranges
                    .iter()
                    .filter(|r| r.is_ipv4() == addr.is_ipv4())
                {
                    firewall_allow.insert(format!("{key} . {}", prefix_text(range)), None);
                }
            }
        }
        if let Some(node_port) = plan.node_port {
            let key = format!("{proto} . {node_port}");
            match &external_route {
                None => {
                    no_endpoint_nodeports.insert(key.clone(), Some(verdict_for(&plan.external)))
                }
                Some(Route::Affinity(chain)) => {
                    service_nodeports.insert(key.clone(), Some(format!("goto {chain}")))
                }
                Some(Route::Shared(eps)) => {
                    let n = eps.len();
                    service_nodeports.insert(key.clone(), Some(format!("goto nodeport-lb-{n}")));
                    let list = nodeport_maps.entry(n).or_default();
                    for (i, ep) in eps.iter().enumerate() {
                        list.push((format!("{key} . {i}"), endpoint_text(ep)));
                    }
                }
            }
            if !plan.external_local {
                nodeport_masq.insert(key, None);
            }
        }
    }
    for n in address_maps.keys().chain(nodeport_maps.keys()) {
        by_count_entry(*n);
    }
    for (n, (mut address_map, mut port_map)) in by_count {
        for (k, v) in address_maps.remove(&n).unwrap_or_default() {
            address_map.insert(k, Some(v));
        }
        for (k, v) in nodeport_maps.remove(&n).unwrap_or_default() {
            port_map.insert(k, Some(v));
        }
        t.chains.insert(
            format!("service-lb-{n}"),
            Chain::new(vec![format!(
                "dnat {ip} to {ip} daddr . meta l4proto . th dport . numgen random mod {n} map @service-endpoints-{n}"
            )]),
        );
        t.chains.insert(
            format!("nodeport-lb-{n}"),
            Chain::new(vec![format!(
                "dnat {ip} to meta l4proto . th dport . numgen random mod {n} map @nodeport-endpoints-{n}"
            )]),
        );
        t.sets.insert(format!("service-endpoints-{n}"), address_map);
        t.sets.insert(format!("nodeport-endpoints-{n}"), port_map);
    }
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
    c.extend(extra_chains);
    let s = &mut t.sets;
    s.insert("service-ips".into(), service_ips);
    s.insert("no-endpoint-services".into(), no_endpoint_services);
    s.insert("cluster-masquerade".into(), cluster_masq);
    s.insert("external-masquerade".into(), external_masq);
    s.insert("firewall-ips".into(), firewall_ips);
    s.insert("firewall-allow".into(), firewall_allow);
    s.insert("service-nodeports".into(), service_nodeports);
    s.insert("no-endpoint-nodeports".into(), no_endpoint_nodeports);
    s.insert("nodeport-masquerade".into(), nodeport_masq);
    s.insert("nodeport-ips".into(), nodeport_ips);
    s.insert("hairpin".into(), hairpin);
    s.extend(extra_sets);
    t
}
