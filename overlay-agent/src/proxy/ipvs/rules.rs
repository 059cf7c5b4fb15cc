//! IPVS mode's iptables rules: fixed (the sets carry the Services), kube-proxy's.

use calyx_dataplane::firewall::iptables::Ruleset;
use calyx_dataplane::firewall::IpFamily;

use super::desired::*;
use crate::proxy::kube_chains::{self, jump};
use crate::proxy::node::POD_INTERFACES_IPTABLES as POD_INTERFACES;

/// The rules: fixed (the sets carry the Services), so a Service change writes none.
pub(super) fn ruleset(family: IpFamily) -> Ruleset {
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
        .insert("KUBE-MARK-MASQ".into(), kube_chains::mark_for_masquerade());
    // Hairpin first: a pod reaching itself through its Service must not see its own
    // address as the source (dropped as a martian).
    let mut postrouting = vec![format!(
        "-m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose\" {} -j MASQUERADE",
        match_set(LOOP_BACK, "dst,dst,src")
    )];
    postrouting.extend(kube_chains::masquerade_marked());
    nat.chains.insert("KUBE-POSTROUTING".into(), postrouting);
    nat.jumps = kube_chains::nat_jumps();
    let filter = r.table("filter");
    filter
        .chains
        .insert("KUBE-FORWARD".into(), kube_chains::forward());
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
    let reject = kube_chains::port_unreachable(family);
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
        jump(
            "INPUT",
            "kubernetes ipvs access filter",
            "KUBE-IPVS-FILTER",
            false,
        ),
        jump(
            "INPUT",
            "kube-proxy firewall rules",
            "KUBE-PROXY-FIREWALL",
            false,
        ),
        jump(
            "INPUT",
            "kubernetes health check rules",
            "KUBE-NODE-PORT",
            false,
        ),
        jump(
            "FORWARD",
            "kube-proxy firewall rules",
            "KUBE-PROXY-FIREWALL",
            false,
        ),
        jump(
            "FORWARD",
            "kubernetes forwarding rules",
            "KUBE-FORWARD",
            false,
        ),
    ];
    // First in their chains: a blanket ACCEPT above them would open host ports on
    // Service addresses and bypass loadBalancerSourceRanges.
    kube_chains::first_in_their_chains(&mut filter.jumps);
    r
}
