//! Firewall rules in chains Calyx owns, with one jump from each builtin chain:
//! - filter CALYX-FORWARD: accept forwarded traffic from and to every pool, so pods
//!   work on hosts whose FORWARD policy is DROP;
//! - nat CALYX-POSTROUTING: never masquerade traffic to a pool (pod-to-pod keeps its
//!   source), masquerade what leaves natOutgoing pools.
//!
//! Every rule matches a pool address as source or destination; the encapsulated VXLAN
//! packets carry underlay addresses, so no rule here can ever rewrite them (the cause
//! of the 63-second stalls of projectcalico/calico#3145).
//!
//! Rules go through the firewall layer: one iptables-restore transaction per family,
//! only when what the kernel holds differs.

use calyx_dataplane::firewall::iptables::{Backend, Jump, Ownership, Ruleset, RulesetSync};
use calyx_dataplane::firewall::{FirewallError, IpFamily};
use calyx_ipam::model::Pool;

pub const FORWARD_CHAIN: &str = "CALYX-FORWARD";
pub const POSTROUTING_CHAIN: &str = "CALYX-POSTROUTING";

/// The rules of one family's chains, one `-A` line each.
pub fn desired_rules(pools: &[Pool], family: IpFamily) -> (Vec<String>, Vec<String>) {
    let of_family: Vec<&Pool> = pools
        .iter()
        .filter(|p| p.is_ipv4() == (family == IpFamily::V4))
        .collect();
    let mut forward = Vec::new();
    let mut nat = Vec::new();
    for pool in &of_family {
        let c = pool.cidr;
        forward.push(format!(
            "-A {FORWARD_CHAIN} -s {c} -m comment --comment \"calyx: from pool {}\" -j ACCEPT",
            pool.name
        ));
        forward.push(format!(
            "-A {FORWARD_CHAIN} -d {c} -m comment --comment \"calyx: to pool {}\" -j ACCEPT",
            pool.name
        ));
        nat.push(format!(
            "-A {POSTROUTING_CHAIN} -d {c} -m comment --comment \"calyx: pool traffic keeps its source\" -j RETURN"
        ));
    }
    for pool in of_family.iter().filter(|p| p.nat_outgoing) {
        nat.push(format!(
            "-A {POSTROUTING_CHAIN} -s {} -m comment --comment \"calyx: natOutgoing {}\" -j MASQUERADE",
            pool.cidr, pool.name
        ));
    }
    (forward, nat)
}

/// Chains the overlay owns; nothing else is ever written, flushed or deleted.
pub fn ownership() -> Ownership {
    Ownership {
        exact: vec![FORWARD_CHAIN, POSTROUTING_CHAIN],
        prefixes: Vec::new(),
    }
}

/// `calyx-agent uninstall`: both families' pool chains and the jumps into them.
pub fn remove(backend: &dyn Backend) -> Result<(), FirewallError> {
    for family in IpFamily::BOTH {
        RulesetSync::new(ownership()).sync(backend, &Ruleset::new(family), true)?;
    }
    Ok(())
}

/// One family's chains and the jumps into them, as the firewall layer takes them.
pub fn desired_ruleset(pools: &[Pool], family: IpFamily) -> Ruleset {
    let (forward, nat) = desired_rules(pools, family);
    let strip = |chain: &str, rules: Vec<String>| -> Vec<String> {
        let prefix = format!("-A {chain} ");
        rules
            .into_iter()
            .map(|r| r.strip_prefix(&prefix).map(str::to_string).unwrap_or(r))
            .collect()
    };
    let mut ruleset = Ruleset::new(family);
    let filter = ruleset.table("filter");
    filter
        .chains
        .insert(FORWARD_CHAIN.into(), strip(FORWARD_CHAIN, forward));
    filter
        .jumps
        .push(Jump::new("FORWARD", format!("-j {FORWARD_CHAIN}")));
    let nat_table = ruleset.table("nat");
    nat_table
        .chains
        .insert(POSTROUTING_CHAIN.into(), strip(POSTROUTING_CHAIN, nat));
    nat_table
        .jumps
        .push(Jump::new("POSTROUTING", format!("-j {POSTROUTING_CHAIN}")));
    ruleset
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, nat: bool) -> Pool {
        let mut p = Pool::with_defaults(cidr.parse().unwrap(), None).unwrap();
        p.nat_outgoing = nat;
        p
    }

    #[test]
    fn every_rule_matches_a_pool_address_and_pool_traffic_is_never_masqueraded() {
        let pools = [
            pool("10.244.0.0/16", true),
            pool("10.245.0.0/16", false),
            pool("fd00::/56", true),
        ];
        let (forward, nat) = desired_rules(&pools, IpFamily::V4);
        assert_eq!(forward.len(), 4);
        assert!(forward
            .iter()
            .all(|r| r.contains("-s 10.24") || r.contains("-d 10.24")));
        // Both RETURNs (every pool as destination) come before any MASQUERADE.
        let first_masq = nat.iter().position(|r| r.contains("MASQUERADE")).unwrap();
        assert_eq!(first_masq, 2);
        assert_eq!(nat.iter().filter(|r| r.contains("MASQUERADE")).count(), 1);
        assert!(nat
            .iter()
            .all(|r| r.contains("-s 10.24") || r.contains("-d 10.24")));
        let (f6, n6) = desired_rules(&pools, IpFamily::V6);
        assert_eq!((f6.len(), n6.len()), (2, 2));
    }

    #[test]
    fn the_ruleset_owns_two_chains_and_jumps_into_them_from_the_builtins() {
        use calyx_dataplane::firewall::iptables::{plan, RecordingIptables, RulesetSync};
        let want = desired_ruleset(&[pool("10.244.0.0/16", true)], IpFamily::V4);
        let fake = RecordingIptables::new();
        fake.append_foreign(IpFamily::V4, "filter", "FORWARD", "-j KUBE-FORWARD");
        fake.append_foreign(IpFamily::V4, "filter", "KUBE-FORWARD", "-j ACCEPT");
        let tx = RulesetSync::new(ownership())
            .sync(&fake, &want, true)
            .unwrap();
        assert!(tx
            .restore_input()
            .contains("*nat\n:CALYX-POSTROUTING - [0:0]\n"));
        assert_eq!(
            fake.chain(IpFamily::V4, "filter", "FORWARD").unwrap(),
            ["-j CALYX-FORWARD", "-j KUBE-FORWARD"]
        );
        assert!(plan(&want, &want).is_empty());
    }
}
