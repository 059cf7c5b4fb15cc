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
//! Rules are written as one iptables-restore batch per family.

use calyx_ipam::model::Pool;
use tokio::process::Command;

pub const FORWARD_CHAIN: &str = "CALYX-FORWARD";
pub const POSTROUTING_CHAIN: &str = "CALYX-POSTROUTING";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// The rules of one family's chains, one `-A` line each.
pub fn desired_rules(pools: &[Pool], family: Family) -> (Vec<String>, Vec<String>) {
    let of_family: Vec<&Pool> = pools
        .iter()
        .filter(|p| p.is_ipv4() == (family == Family::V4))
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

/// The iptables-restore input: our chains declared (which flushes them under
/// --noflush) and refilled, plus the jumps that are missing.
pub fn restore_batch(forward: &[String], nat: &[String], missing_jumps: &[Jump]) -> String {
    let mut out = String::from("*filter\n");
    out.push_str(&format!(":{FORWARD_CHAIN} - [0:0]\n"));
    for jump in missing_jumps.iter().filter(|j| j.table == "filter") {
        out.push_str(&format!("-I {} 1 -j {}\n", jump.from, jump.to));
    }
    for rule in forward {
        out.push_str(rule);
        out.push('\n');
    }
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&format!(":{POSTROUTING_CHAIN} - [0:0]\n"));
    for jump in missing_jumps.iter().filter(|j| j.table == "nat") {
        out.push_str(&format!("-I {} 1 -j {}\n", jump.from, jump.to));
    }
    for rule in nat {
        out.push_str(rule);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

pub const JUMPS: [Jump; 2] = [
    Jump {
        table: "filter",
        from: "FORWARD",
        to: FORWARD_CHAIN,
    },
    Jump {
        table: "nat",
        from: "POSTROUTING",
        to: POSTROUTING_CHAIN,
    },
];

/// Installs or repairs one family's rules. Returns whether anything had to change.
/// `applied` remembers what the kernel printed back after the last apply, so a check
/// compares like with like (iptables normalises what it is given).
pub async fn ensure(
    pools: &[Pool],
    family: Family,
    applied: &mut Option<Vec<String>>,
) -> anyhow::Result<bool> {
    let (forward, nat) = desired_rules(pools, family);
    let mut missing = Vec::new();
    for jump in &JUMPS {
        let present = run(
            family.iptables(),
            &["-w", "-t", jump.table, "-C", jump.from, "-j", jump.to],
        )
        .await
        .is_ok();
        if !present {
            missing.push(jump.clone());
        }
    }
    let current = listing(family).await.ok();
    if missing.is_empty() && current.is_some() && current == *applied {
        return Ok(false);
    }
    let batch = restore_batch(&forward, &nat, &missing);
    restore(family, &batch).await?;
    *applied = Some(listing(family).await?);
    tracing::info!(
        ?family,
        missing_jumps = missing.len(),
        rules = forward.len() + nat.len(),
        "firewall rules written"
    );
    Ok(true)
}

/// Our chains as the kernel has them (`-S` output).
async fn listing(family: Family) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for (table, chain) in [("filter", FORWARD_CHAIN), ("nat", POSTROUTING_CHAIN)] {
        let out = run(family.iptables(), &["-w", "-t", table, "-S", chain]).await?;
        lines.extend(out.lines().map(str::to_string));
    }
    Ok(lines)
}

async fn restore(family: Family, batch: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let program = format!("{}-restore", family.iptables());
    let mut child = Command::new(&program)
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("run {program}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(batch.as_bytes())
        .await?;
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} failed: {}\ninput was:\n{batch}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("run {program}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
        let (forward, nat) = desired_rules(&pools, Family::V4);
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
        let (f6, n6) = desired_rules(&pools, Family::V6);
        assert_eq!((f6.len(), n6.len()), (2, 2));
    }

    #[test]
    fn batch_declares_our_chains_and_inserts_only_missing_jumps() {
        let (forward, nat) = desired_rules(&[pool("10.244.0.0/16", true)], Family::V4);
        let batch = restore_batch(&forward, &nat, &JUMPS[1..]);
        assert!(batch.starts_with("*filter\n:CALYX-FORWARD - [0:0]\n-A CALYX-FORWARD"));
        assert!(!batch.contains("-I FORWARD"));
        assert!(batch
            .contains("*nat\n:CALYX-POSTROUTING - [0:0]\n-I POSTROUTING 1 -j CALYX-POSTROUTING\n"));
        assert!(batch.ends_with("COMMIT\n"));
    }
}
