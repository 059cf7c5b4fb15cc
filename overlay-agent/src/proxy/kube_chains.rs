//! kube-proxy's iptables chains that iptables mode and IPVS mode both write, with
//! kube-proxy's names and rules: KUBE-MARK-MASQ, KUBE-POSTROUTING, KUBE-FORWARD, the
//! jumps into them, and which chains are kube-proxy's. Neither mode imports the other;
//! both take these from here.

use calyx_dataplane::firewall::iptables::{self as ipt, Jump, Ownership, Rule, RulesetSync};
use calyx_dataplane::firewall::IpFamily;

use super::node::MASQUERADE_MARK;

/// The chains of kube-proxy's iptables mode (kubelet's KUBE-FIREWALL,
/// KUBE-KUBELET-CANARY... are not among them).
pub const CHAINS: [&str; 7] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
];

/// The per-Service and per-endpoint chains of kube-proxy's iptables mode.
pub const CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SEP-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SVL-",
];

/// Ownership of kube-proxy's iptables-mode chains, plus `extra` exact names.
pub fn ownership(extra: &[&'static str]) -> Ownership {
    let mut exact = CHAINS.to_vec();
    exact.extend_from_slice(extra);
    Ownership {
        exact,
        prefixes: CHAIN_PREFIXES.to_vec(),
    }
}

fn mark() -> String {
    format!("{MASQUERADE_MARK:#x}")
}

/// KUBE-MARK-MASQ's one rule: mark the packet for masquerading.
pub fn mark_for_masquerade() -> Vec<String> {
    let mark = mark();
    vec![Rule::new().jump(format!("MARK --set-xmark {mark}/{mark}"))]
}

/// KUBE-POSTROUTING's rules: masquerade marked packets, clearing the mark first.
pub fn masquerade_marked() -> Vec<String> {
    let mark = mark();
    vec![
        Rule::new()
            .matching(format!("mark ! --mark {mark}/{mark}"))
            .jump("RETURN"),
        // Cleared before MASQUERADE: an encapsulated VXLAN packet inherits the inner
        // packet's mark and must never be NATed itself (the 63-second stall).
        Rule::new().jump(format!("MARK --set-xmark {mark}/0x0")),
        Rule::new()
            .comment("kubernetes service traffic requiring SNAT")
            .jump("MASQUERADE --random-fully"),
    ]
}

/// KUBE-FORWARD's rules: forward marked Service traffic and the replies of accepted
/// connections, whatever the host's FORWARD policy.
pub fn forward() -> Vec<String> {
    let mark = mark();
    vec![
        Rule::new()
            .comment("kubernetes forwarding rules")
            .matching(format!("mark --mark {mark}/{mark}"))
            .jump("ACCEPT"),
        Rule::new()
            .comment("kubernetes forwarding conntrack rule")
            .matching("conntrack --ctstate RELATED,ESTABLISHED")
            .jump("ACCEPT"),
    ]
}

/// A jump from a builtin chain into one of ours, with kube-proxy's comment; only for
/// new connections when `new_only`.
pub fn jump(from: &str, comment: &str, to: &str, new_only: bool) -> Jump {
    let rule = if new_only {
        Rule::new().matching("conntrack --ctstate NEW")
    } else {
        Rule::new()
    };
    Jump::new(from, rule.comment(comment).jump(to))
}

/// The jumps into nat's KUBE-SERVICES and KUBE-POSTROUTING, as both modes have them.
pub fn nat_jumps() -> Vec<Jump> {
    vec![
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
    ]
}

/// Marks filter jumps as first in their chains: a blanket ACCEPT above them (another
/// plugin's, an operator's) would let new connections to a Service without endpoints
/// time out instead of being refused, open host ports on Service addresses and bypass
/// loadBalancerSourceRanges.
pub fn first_in_their_chains(jumps: &mut [Jump]) {
    for j in jumps {
        j.first = true;
    }
}

/// The ICMP error a refused connection gets in this family (TCP gets a reset instead).
pub fn port_unreachable(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "icmp-port-unreachable",
        IpFamily::V6 => "icmp6-port-unreachable",
    }
}

/// Whether either family's jumps into our chains are gone or pushed down (read
/// cheaply: only the builtin chains they are in).
pub fn jumps_drifted(rulesets: &[RulesetSync; 2], backend: &dyn ipt::Backend) -> Option<String> {
    IpFamily::BOTH
        .into_iter()
        .zip(rulesets)
        .find_map(|(family, sync)| match sync.jumps_drifted(backend) {
            Ok(false) => None,
            Ok(true) => Some(format!("{family}: a jump into our chains is gone or moved")),
            Err(e) => Some(format!("{family}: could not look: {e}")),
        })
}
