//! iptables mode's rules as data, with kube-proxy's chain layout and names
//! (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*, KUBE-EXT-*, KUBE-FW-*, KUBE-SVL-*,
//! KUBE-NODEPORTS, KUBE-MARK-MASQ, KUBE-POSTROUTING, mark 0x4000), so runbooks written
//! for kube-proxy apply. Chain names are kube-proxy's hashes of the port name, so they
//! match a kube-proxy node's too. Rules are built with `iptables::Rule`, in the form
//! iptables-save prints, so a restart rewrites nothing.
//!
//! A Service's rules are computed on their own (`service_rules`): the chains only it
//! has, and its rules in the chains every Service shares, so that a change recomputes
//! only the changed Services.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use calyx_dataplane::firewall::iptables::{Ownership, Rule, Ruleset};
use calyx_dataplane::firewall::IpFamily;
use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use crate::proxy::kube_chains;
use crate::proxy::model::{NoEndpoints, PortPlan, Protocol, Targets};
use crate::proxy::node::{NodeSettings, POD_INTERFACES_IPTABLES};

/// The chains this mode owns.
pub fn ownership() -> Ownership {
    kube_chains::ownership(&[])
}

/// The chains every Service adds rules to, in the order the rules of all Services
/// are laid out in them (by Service key, then port name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SharedChain {
    /// nat KUBE-SERVICES: ClusterIPs, externalIPs and LoadBalancer IPs to their chains.
    NatServices,
    /// nat KUBE-NODEPORTS.
    NatNodePorts,
    /// filter KUBE-SERVICES: ClusterIPs without endpoints refused.
    FilterServices,
    /// filter KUBE-EXTERNAL-SERVICES: external traffic without usable endpoints.
    FilterExternal,
    /// filter KUBE-PROXY-FIREWALL: LoadBalancer traffic from outside the source ranges.
    FilterFirewall,
}

impl SharedChain {
    pub const ALL: [SharedChain; 5] = [
        SharedChain::NatServices,
        SharedChain::NatNodePorts,
        SharedChain::FilterServices,
        SharedChain::FilterExternal,
        SharedChain::FilterFirewall,
    ];

    pub fn table(self) -> &'static str {
        match self {
            SharedChain::NatServices | SharedChain::NatNodePorts => "nat",
            _ => "filter",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SharedChain::NatServices | SharedChain::FilterServices => "KUBE-SERVICES",
            SharedChain::NatNodePorts => "KUBE-NODEPORTS",
            SharedChain::FilterExternal => "KUBE-EXTERNAL-SERVICES",
            SharedChain::FilterFirewall => "KUBE-PROXY-FIREWALL",
        }
    }
}

/// One Service's rules in one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// The nat chains only this Service has (KUBE-SVC-*, KUBE-SEP-*, ...).
    pub chains: BTreeMap<String, Vec<String>>,
    /// Its rules in the shared chains.
    pub shared: BTreeMap<SharedChain, Vec<String>>,
}

impl ServiceRules {
    fn push(&mut self, chain: SharedChain, rule: String) {
        self.shared.entry(chain).or_default().push(rule);
    }
}

/// kube-proxy's portProtoHash: base32(sha256(name + protocol)), 16 characters.
fn hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut encoded = data_encoding::BASE32.encode(&digest);
    encoded.truncate(16);
    encoded
}

fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

fn cidr(net: &IpNetwork) -> String {
    format!("{}/{}", net.network(), net.prefix())
}

fn destination(ep: &SocketAddr) -> String {
    match ep {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}

struct Names {
    svc: String,
    ext: String,
    fw: String,
    svl: String,
}

fn names(plan: &PortPlan) -> Names {
    let h = hash(&format!(
        "{}{}",
        plan.port_name_string(),
        plan.protocol.name()
    ));
    Names {
        svc: format!("KUBE-SVC-{h}"),
        ext: format!("KUBE-EXT-{h}"),
        fw: format!("KUBE-FW-{h}"),
        svl: format!("KUBE-SVL-{h}"),
    }
}

fn sep_name(plan: &PortPlan, ep: &SocketAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash(&format!(
            "{}{}{}",
            plan.port_name_string(),
            plan.protocol.name(),
            ep
        ))
    )
}

fn address_mask(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "255.255.255.255",
        IpFamily::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    }
}

/// The rules of one Service's port plans (one family's, as `model` computed them).
pub fn service_rules(plans: &[&PortPlan], family: IpFamily) -> ServiceRules {
    let mut out = ServiceRules::default();
    for plan in plans {
        port_rules(plan, family, &mut out);
    }
    out
}

fn port_rules(plan: &PortPlan, family: IpFamily, out: &mut ServiceRules) {
    let mask = address_mask(family);
    let proto = plan.protocol.name();
    let port_name = plan.port_name_string();
    let n = names(plan);
    // TCP gets a reset (as in nftables mode): refused at once whatever the client makes
    // of an ICMP error; the rest an ICMP port unreachable.
    let refusal = match plan.protocol {
        Protocol::Tcp => "tcp-reset",
        _ => kube_chains::port_unreachable(family),
    };
    let refuse = |rule: Rule, targets: &Targets| match targets.otherwise {
        NoEndpoints::Reject => rule.jump(format!("REJECT --reject-with {refusal}")),
        NoEndpoints::Drop => rule.jump("DROP"),
    };
    let service_port = |address: &IpAddr, comment: String| {
        Rule::new()
            .destination(host(address))
            .protocol(proto)
            .comment(comment)
            .dport(plan.port)
    };

    // Endpoint chains, shared by cluster and external traffic.
    for ep in plan.all_endpoints() {
        let sep = sep_name(plan, ep);
        let mut dnat = Rule::new().protocol(proto).comment(&port_name);
        if plan.affinity_seconds.is_some() {
            dnat = dnat.matching(format!("recent --set --name {sep} --mask {mask} --rsource"));
        }
        let rules = vec![
            Rule::new()
                .source(host(&ep.ip()))
                .comment(&port_name)
                .jump("KUBE-MARK-MASQ"),
            dnat.matching(proto)
                .jump(format!("DNAT --to-destination {}", destination(ep))),
        ];
        out.chains.insert(sep, rules);
    }
    // Spreads new connections over `endpoints` (clients seen within the affinity time
    // go back to theirs first).
    let balance = |endpoints: &[SocketAddr]| -> Vec<String> {
        let mut rules = Vec::new();
        let to =
            |ep: &SocketAddr| Rule::new().comment(format!("{port_name} -> {}", destination(ep)));
        if let Some(seconds) = plan.affinity_seconds {
            for ep in endpoints {
                let sep = sep_name(plan, ep);
                rules.push(
                    to(ep)
                        .matching(format!(
                            "recent --rcheck --seconds {seconds} --reap --name {sep} --mask {mask} --rsource"
                        ))
                        .jump(&sep),
                );
            }
        }
        let count = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let sep = sep_name(plan, ep);
            let left = count - i;
            let rule = if left > 1 {
                to(ep).matching(format!(
                    "statistic --mode random --probability {:.11}",
                    1.0 / left as f64
                ))
            } else {
                to(ep)
            };
            rules.push(rule.jump(&sep));
        }
        rules
    };

    // Cluster traffic.
    if !plan.cluster.endpoints.is_empty() {
        let mut rules = Vec::new();
        for vip in &plan.cluster_ips {
            rules.push(
                Rule::new()
                    .destination(host(vip))
                    .not_in_interface(POD_INTERFACES_IPTABLES)
                    .protocol(proto)
                    .comment(format!("{port_name} cluster IP"))
                    .dport(plan.port)
                    .jump("KUBE-MARK-MASQ"),
            );
        }
        rules.extend(balance(&plan.cluster.endpoints));
        out.chains.insert(n.svc.clone(), rules);
        for vip in &plan.cluster_ips {
            out.push(
                SharedChain::NatServices,
                service_port(vip, format!("{port_name} cluster IP")).jump(&n.svc),
            );
        }
    } else {
        for vip in &plan.cluster_ips {
            out.push(
                SharedChain::FilterServices,
                refuse(
                    service_port(vip, format!("{port_name} has no endpoints")),
                    &plan.cluster,
                ),
            );
        }
    }

    // External traffic: externalIPs, LoadBalancer IPs, NodePorts.
    let has_external = !plan.external_ips.is_empty() || plan.node_port.is_some();
    if !has_external {
        return;
    }
    if plan.external.endpoints.is_empty() {
        for addr in &plan.external_ips {
            out.push(
                SharedChain::FilterExternal,
                refuse(
                    service_port(addr, format!("{port_name} has no local endpoints")),
                    &plan.external,
                ),
            );
        }
        if let Some(node_port) = plan.node_port {
            out.push(
                SharedChain::FilterExternal,
                refuse(
                    Rule::new()
                        .protocol(proto)
                        .comment(format!("{port_name} has no local endpoints"))
                        .matching("addrtype --dst-type LOCAL")
                        .dport(node_port),
                    &plan.external,
                ),
            );
        }
        return;
    }
    let ext = if plan.external_local {
        out.chains
            .insert(n.svl.clone(), balance(&plan.external.endpoints));
        vec![Rule::new().jump(&n.svl)]
    } else {
        if plan.cluster.endpoints.is_empty() {
            // Internal Local with none here: external traffic still reaches the cluster.
            out.chains
                .insert(n.svc.clone(), balance(&plan.external.endpoints));
        }
        vec![
            Rule::new()
                .comment(format!(
                    "masquerade traffic for {port_name} external destinations"
                ))
                .jump("KUBE-MARK-MASQ"),
            Rule::new().jump(&n.svc),
        ]
    };
    out.chains.insert(n.ext.clone(), ext);
    let firewalled = !plan.source_ranges.is_empty();
    for addr in &plan.external_ips {
        let is_lb = plan.load_balancer_ips.contains(addr);
        let what = if is_lb {
            "loadbalancer IP"
        } else {
            "external IP"
        };
        let target = if is_lb && firewalled { &n.fw } else { &n.ext };
        out.push(
            SharedChain::NatServices,
            service_port(addr, format!("{port_name} {what}")).jump(target),
        );
        if is_lb && firewalled {
            out.push(
                SharedChain::FilterFirewall,
                service_port(
                    addr,
                    format!("{port_name} traffic not accepted by {}", n.fw),
                )
                .jump("DROP"),
            );
        }
    }
    if firewalled && !plan.load_balancer_ips.is_empty() {
        let mut fw: Vec<String> = plan
            .source_ranges
            .iter()
            .filter(|s| IpFamily::of(s.ip()) == family)
            .map(|s| {
                Rule::new()
                    .source(cidr(s))
                    .comment(format!("{port_name} loadbalancer IP"))
                    .jump(&n.ext)
            })
            .collect();
        fw.dedup();
        out.chains.insert(n.fw.clone(), fw);
    }
    if let Some(node_port) = plan.node_port {
        out.push(
            SharedChain::NatNodePorts,
            Rule::new()
                .protocol(proto)
                .comment(&port_name)
                .dport(node_port)
                .jump(&n.ext),
        );
    }
}

/// The last rules of nat KUBE-SERVICES, after every Service's: NodePorts on the
/// node-port addresses only, never on loopback.
pub fn node_ports_last(family: IpFamily, node: &NodeSettings) -> Vec<String> {
    let loopback = match family {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    };
    let mut rules = vec![Rule::new()
        .destination(loopback)
        .comment("no NodePorts on loopback")
        .jump("RETURN")];
    for net in node
        .nodeport_addresses
        .iter()
        .filter(|n| IpFamily::of(n.ip()) == family)
    {
        rules.push(
            Rule::new()
                .destination(cidr(net))
                .comment(
                    "kubernetes service nodeports; NOTE: this must be the last rule in this chain",
                )
                .matching("addrtype --dst-type LOCAL")
                .jump("KUBE-NODEPORTS"),
        );
    }
    rules
}

/// The rules no Service changes: KUBE-MARK-MASQ, KUBE-POSTROUTING, KUBE-FORWARD, the
/// jumps from the builtin chains, and the shared chains, empty.
pub fn skeleton(family: IpFamily) -> Ruleset {
    use kube_chains::jump;
    let mut r = Ruleset::new(family);
    for chain in SharedChain::ALL {
        r.table(chain.table())
            .chains
            .insert(chain.name().into(), Vec::new());
    }
    let nat = r.table("nat");
    nat.chains
        .insert("KUBE-MARK-MASQ".into(), kube_chains::mark_for_masquerade());
    nat.chains
        .insert("KUBE-POSTROUTING".into(), kube_chains::masquerade_marked());
    nat.jumps = kube_chains::nat_jumps();
    let filter = r.table("filter");
    filter
        .chains
        .insert("KUBE-FORWARD".into(), kube_chains::forward());
    let firewall = "kubernetes load balancer firewall";
    let external = "kubernetes externally-visible service portals";
    let portals = "kubernetes service portals";
    filter.jumps = vec![
        jump("INPUT", firewall, "KUBE-PROXY-FIREWALL", true),
        jump("INPUT", external, "KUBE-EXTERNAL-SERVICES", true),
        jump("FORWARD", firewall, "KUBE-PROXY-FIREWALL", true),
        jump(
            "FORWARD",
            "kubernetes forwarding rules",
            "KUBE-FORWARD",
            false,
        ),
        jump("FORWARD", portals, "KUBE-SERVICES", true),
        jump("FORWARD", external, "KUBE-EXTERNAL-SERVICES", true),
        jump("OUTPUT", firewall, "KUBE-PROXY-FIREWALL", true),
        jump("OUTPUT", portals, "KUBE-SERVICES", true),
    ];
    kube_chains::first_in_their_chains(&mut filter.jumps);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_kube_proxys_hashes() {
        // kube-proxy's servicePortChainName("ns1/svc1:p80", "tcp"), from its unit tests.
        assert_eq!(hash("ns1/svc1:p80tcp"), "XPGD46QRK7WJZT7O");
    }
}
