//! iptables mode with kube-proxy's chain layout and names (KUBE-SERVICES, KUBE-SVC-*,
//! KUBE-SEP-*, KUBE-EXT-*, KUBE-FW-*, KUBE-SVL-*, KUBE-NODEPORTS, KUBE-MARK-MASQ,
//! KUBE-POSTROUTING, mark 0x4000), so runbooks written for kube-proxy apply. Chain names
//! are kube-proxy's hashes of the port name, so they match a kube-proxy node's too.
//! Rules are written in the form iptables-save prints, so a restart rewrites nothing.

use std::net::{IpAddr, SocketAddr};

use calyx_dataplane::firewall::iptables::{Jump, Ownership, Ruleset};
use calyx_dataplane::firewall::IpFamily;
use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use super::model::{NoEndpoints, PortPlan, Protocol, Targets};
use super::nftables::{NodeContext, MASQUERADE_MARK};

pub(super) const POD_INTERFACES: &str = "cyx+";

/// The chains this mode owns (kubelet's KUBE-FIREWALL, KUBE-KUBELET-CANARY... are not).
pub fn ownership() -> Ownership {
    Ownership {
        exact: vec![
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-FORWARD",
            "KUBE-PROXY-FIREWALL",
        ],
        prefixes: vec![
            "KUBE-SVC-",
            "KUBE-SEP-",
            "KUBE-EXT-",
            "KUBE-FW-",
            "KUBE-SVL-",
        ],
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

/// KUBE-MARK-MASQ's rule: mark the packet for masquerading.
pub(super) fn mark_rule() -> String {
    let mark = format!("{MASQUERADE_MARK:#x}");
    format!("-j MARK --set-xmark {mark}/{mark}")
}

/// KUBE-POSTROUTING's rules: masquerade marked packets, clearing the mark first.
pub(super) fn masquerade_marked_rules() -> Vec<String> {
    let mark = format!("{MASQUERADE_MARK:#x}");
    vec![
        format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
        // Cleared before MASQUERADE: an encapsulated VXLAN packet inherits the inner
        // packet's mark and must never be NATed itself (the 63-second stall).
        format!("-j MARK --set-xmark {mark}/0x0"),
        "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
    ]
}

pub fn desired_ruleset(plans: &[PortPlan], family: IpFamily, ctx: &NodeContext) -> Ruleset {
    let (mask, reject_with, loopback) = match family {
        IpFamily::V4 => ("255.255.255.255", "icmp-port-unreachable", "127.0.0.0/8"),
        IpFamily::V6 => (
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "icmp6-port-unreachable",
            "::1/128",
        ),
    };
    let mark = format!("{MASQUERADE_MARK:#x}");
    let mut r = Ruleset::new(family);
    let mut nat_services = Vec::new();
    let mut nat_nodeports = Vec::new();
    let mut filter_services = Vec::new();
    let mut filter_external = Vec::new();
    let mut filter_firewall = Vec::new();
    let mut nat_chains: Vec<(String, Vec<String>)> = Vec::new();

    for plan in plans {
        let proto = plan.protocol.name();
        let port_name = plan.port_name_string();
        let n = names(plan);
        let dport = |port: u16| format!("-m {proto} --dport {port}");
        // TCP gets a reset (as in nftables mode): refused at once whatever the client
        // makes of an ICMP error; the rest an ICMP port unreachable.
        let reject_with = if plan.protocol == Protocol::Tcp {
            "tcp-reset"
        } else {
            reject_with
        };
        let reject = |targets: &Targets, comment: &str| match targets.otherwise {
            NoEndpoints::Reject => format!(
                "-m comment --comment \"{comment}\" {{}} -j REJECT --reject-with {reject_with}"
            ),
            NoEndpoints::Drop => format!("-m comment --comment \"{comment}\" {{}} -j DROP"),
        };
        // Endpoint chains, shared by cluster and external traffic.
        for ep in plan.all_endpoints() {
            let sep = sep_name(plan, ep);
            let mut rules = vec![format!(
                "-s {} -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ",
                host(&ep.ip())
            )];
            let recent = plan
                .affinity_seconds
                .map(|_| format!("-m recent --set --name {sep} --mask {mask} --rsource "))
                .unwrap_or_default();
            rules.push(format!(
                "-p {proto} -m comment --comment \"{port_name}\" {recent}-m {proto} -j DNAT --to-destination {}",
                destination(ep)
            ));
            nat_chains.push((sep, rules));
        }
        let balance = |chain_comment: &str, endpoints: &[SocketAddr]| -> Vec<String> {
            let mut rules = Vec::new();
            if let Some(seconds) = plan.affinity_seconds {
                for ep in endpoints {
                    let sep = sep_name(plan, ep);
                    rules.push(format!(
                        "-m comment --comment \"{chain_comment} -> {}\" -m recent --rcheck --seconds {seconds} --reap --name {sep} --mask {mask} --rsource -j {sep}",
                        destination(ep)
                    ));
                }
            }
            let count = endpoints.len();
            for (i, ep) in endpoints.iter().enumerate() {
                let sep = sep_name(plan, ep);
                let left = count - i;
                if left > 1 {
                    rules.push(format!(
                        "-m comment --comment \"{chain_comment} -> {}\" -m statistic --mode random --probability {:.11} -j {sep}",
                        destination(ep),
                        1.0 / left as f64
                    ));
                } else {
                    rules.push(format!(
                        "-m comment --comment \"{chain_comment} -> {}\" -j {sep}",
                        destination(ep)
                    ));
                }
            }
            rules
        };
        // Cluster traffic.
        if !plan.cluster.endpoints.is_empty() {
            let mut rules = Vec::new();
            for vip in &plan.cluster_ips {
                rules.push(format!(
                    "-d {} ! -i {POD_INTERFACES} -p {proto} -m comment --comment \"{port_name} cluster IP\" {} -j KUBE-MARK-MASQ",
                    host(vip),
                    dport(plan.port)
                ));
            }
            rules.extend(balance(&port_name, &plan.cluster.endpoints));
            nat_chains.push((n.svc.clone(), rules));
            for vip in &plan.cluster_ips {
                nat_services.push(format!(
                    "-d {} -p {proto} -m comment --comment \"{port_name} cluster IP\" {} -j {}",
                    host(vip),
                    dport(plan.port),
                    n.svc
                ));
            }
        } else {
            for vip in &plan.cluster_ips {
                filter_services.push(
                    reject(&plan.cluster, &format!("{port_name} has no endpoints"))
                        .replace("{}", &dport(plan.port))
                        .replacen(
                            "-m comment",
                            &format!("-d {} -p {proto} -m comment", host(vip)),
                            1,
                        ),
                );
            }
        }
        // External traffic: externalIPs, LoadBalancer IPs, NodePorts.
        let has_external = !plan.external_ips.is_empty() || plan.node_port.is_some();
        if has_external && !plan.external.endpoints.is_empty() {
            let mut ext = Vec::new();
            if !plan.external_local {
                ext.push(format!(
                    "-m comment --comment \"masquerade traffic for {port_name} external destinations\" -j KUBE-MARK-MASQ"
                ));
                ext.push(format!("-j {}", n.svc));
                if plan.cluster.endpoints.is_empty() {
                    // Internal Local with none here: external still reaches the cluster.
                    nat_chains.push((n.svc.clone(), balance(&port_name, &plan.external.endpoints)));
                }
            } else {
                ext.push(format!("-j {}", n.svl));
                nat_chains.push((n.svl.clone(), balance(&port_name, &plan.external.endpoints)));
            }
            nat_chains.push((n.ext.clone(), ext));
            for addr in &plan.external_ips {
                let is_lb = plan.load_balancer_ips.contains(addr);
                let target = if is_lb && !plan.source_ranges.is_empty() {
                    &n.fw
                } else {
                    &n.ext
                };
                let what = if is_lb {
                    "loadbalancer IP"
                } else {
                    "external IP"
                };
                nat_services.push(format!(
                    "-d {} -p {proto} -m comment --comment \"{port_name} {what}\" {} -j {target}",
                    host(addr),
                    dport(plan.port)
                ));
                if is_lb && !plan.source_ranges.is_empty() {
                    filter_firewall.push(format!(
                        "-d {} -p {proto} -m comment --comment \"{port_name} traffic not accepted by {}\" {} -j DROP",
                        host(addr),
                        n.fw,
                        dport(plan.port)
                    ));
                }
            }
            if !plan.source_ranges.is_empty() && !plan.load_balancer_ips.is_empty() {
                let mut fw: Vec<String> = plan
                    .source_ranges
                    .iter()
                    .filter(|s| IpFamily::of(s.ip()) == family)
                    .map(|s| {
                        format!(
                            "-s {} -m comment --comment \"{port_name} loadbalancer IP\" -j {}",
                            cidr(s),
                            n.ext
                        )
                    })
                    .collect();
                fw.dedup();
                nat_chains.push((n.fw.clone(), fw));
            }
            if let Some(node_port) = plan.node_port {
                nat_nodeports.push(format!(
                    "-p {proto} -m comment --comment \"{port_name}\" {} -j {}",
                    dport(node_port),
                    n.ext
                ));
            }
        } else if has_external {
            for addr in &plan.external_ips {
                filter_external.push(
                    reject(
                        &plan.external,
                        &format!("{port_name} has no local endpoints"),
                    )
                    .replace("{}", &dport(plan.port))
                    .replacen(
                        "-m comment",
                        &format!("-d {} -p {proto} -m comment", host(addr)),
                        1,
                    ),
                );
            }
            if let Some(node_port) = plan.node_port {
                filter_external.push(
                    reject(
                        &plan.external,
                        &format!("{port_name} has no local endpoints"),
                    )
                    .replace(
                        "{}",
                        &format!("-m addrtype --dst-type LOCAL {}", dport(node_port)),
                    )
                    .replacen(
                        "-m comment",
                        &format!("-p {proto} -m comment"),
                        1,
                    ),
                );
            }
        }
    }
    // NodePorts last, on the node-port addresses only, never on loopback.
    nat_services.push(format!(
        "-d {loopback} -m comment --comment \"no NodePorts on loopback\" -j RETURN"
    ));
    for net in ctx
        .nodeport_addresses
        .iter()
        .filter(|n| IpFamily::of(n.ip()) == family)
    {
        nat_services.push(format!(
            "-d {} -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
            cidr(net)
        ));
    }

    let nat = r.table("nat");
    for (name, rules) in nat_chains {
        nat.chains.insert(name, rules);
    }
    nat.chains.insert("KUBE-SERVICES".into(), nat_services);
    nat.chains.insert("KUBE-NODEPORTS".into(), nat_nodeports);
    nat.chains
        .insert("KUBE-MARK-MASQ".into(), vec![mark_rule()]);
    nat.chains
        .insert("KUBE-POSTROUTING".into(), masquerade_marked_rules());
    let jump = |from: &str, comment: &str, to: &str, new_only: bool| {
        let state = if new_only {
            "-m conntrack --ctstate NEW "
        } else {
            ""
        };
        Jump::new(
            from,
            format!("{state}-m comment --comment \"{comment}\" -j {to}"),
        )
    };
    nat.jumps = vec![
        jump(
            "PREROUTING",
            "kubernetes service portals",
            "KUBE-SERVICES",
            false,
        ),
        jump(
            "OUTPUT",
            "kubernetes service portals",
            "KUBE-SERVICES",
            false,
        ),
        jump(
            "POSTROUTING",
            "kubernetes postrouting rules",
            "KUBE-POSTROUTING",
            false,
        ),
    ];
    let filter = r.table("filter");
    filter
        .chains
        .insert("KUBE-SERVICES".into(), filter_services);
    filter
        .chains
        .insert("KUBE-EXTERNAL-SERVICES".into(), filter_external);
    filter
        .chains
        .insert("KUBE-PROXY-FIREWALL".into(), filter_firewall);
    filter.chains.insert(
        "KUBE-FORWARD".into(),
        vec![
            format!("-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"),
            "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
        ],
    );
    filter.jumps = vec![
        jump(
            "INPUT",
            "kubernetes load balancer firewall",
            "KUBE-PROXY-FIREWALL",
            true,
        ),
        jump(
            "INPUT",
            "kubernetes externally-visible service portals",
            "KUBE-EXTERNAL-SERVICES",
            true,
        ),
        jump(
            "FORWARD",
            "kubernetes load balancer firewall",
            "KUBE-PROXY-FIREWALL",
            true,
        ),
        jump(
            "FORWARD",
            "kubernetes forwarding rules",
            "KUBE-FORWARD",
            false,
        ),
        jump(
            "FORWARD",
            "kubernetes service portals",
            "KUBE-SERVICES",
            true,
        ),
        jump(
            "FORWARD",
            "kubernetes externally-visible service portals",
            "KUBE-EXTERNAL-SERVICES",
            true,
        ),
        jump(
            "OUTPUT",
            "kubernetes load balancer firewall",
            "KUBE-PROXY-FIREWALL",
            true,
        ),
        jump(
            "OUTPUT",
            "kubernetes service portals",
            "KUBE-SERVICES",
            true,
        ),
    ];
    // Filter jumps come first: a blanket ACCEPT of pod traffic above them would let new
    // connections to a Service without endpoints time out instead of being refused.
    for j in &mut filter.jumps {
        j.first = true;
    }
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
