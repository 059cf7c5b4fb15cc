//! IPVS mode with kube-proxy's names, so runbooks written for kube-proxy's IPVS mode
//! apply: the `kube-ipvs0` dummy device holding every ClusterIP, externalIP and
//! LoadBalancer IP; an IPVS virtual service per (IP, protocol, port) and per NodePort on
//! each node-port address, masquerading to the ready endpoints; kube-proxy's ipsets
//! (KUBE-CLUSTER-IP, KUBE-LOOP-BACK, KUBE-NODE-PORT-*, ... and KUBE-6-* for IPv6) and
//! chains (KUBE-SERVICES, KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-NODE-PORT,
//! KUBE-LOAD-BALANCER, KUBE-FORWARD, KUBE-IPVS-FILTER), mark 0x4000.
//!
//! `desired` computes all of it as data from the port plans; `sync::IpvsSync` writes
//! what differs from the kernel: sets (one `ipset restore`), then rules (one
//! `iptables-restore`), then addresses and virtual services (one netlink batch).
//! A real server that goes away is drained, not cut: weight 0 until its connections end
//! or `drain_timeout` passes (kubernetes#57841).

pub mod addresses;
pub mod desired;
mod rules;
pub mod sync;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use calyx_dataplane::firewall::ipset::{self, IpsetSync};
use calyx_dataplane::firewall::iptables::{self as ipt, Ownership, Ruleset, RulesetSync};
use calyx_dataplane::firewall::IpFamily;
use calyx_dataplane::ipvs;

use super::kube_chains;
use super::node::NodeSettings;
use super::proxier::{Changes, Proxier, Result, Scope};
use addresses::Addresses;
use desired::{owns_set, IpvsAssembler};
use sync::{IpvsBackends, IpvsScope, IpvsSync};

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
    kube_chains::ownership(&IPVS_ONLY_CHAINS)
}

pub struct IpvsProxier {
    backends: IpvsBackends,
    iptables: Box<dyn ipt::Backend>,
    node: NodeSettings,
    default_scheduler: String,
    sync: IpvsSync,
    rulesets: [RulesetSync; 2],
    assemblers: [Option<IpvsAssembler>; 2],
    /// The node addresses NodePorts open on, read on full syncs and checks (not on
    /// each change: the address dump lists every kube-ipvs0 address too).
    node_ips: Option<Vec<IpAddr>>,
}

impl IpvsProxier {
    pub fn new(
        backends: IpvsBackends,
        iptables: Box<dyn ipt::Backend>,
        node: NodeSettings,
        default_scheduler: String,
        drain_timeout: Duration,
    ) -> IpvsProxier {
        IpvsProxier {
            backends,
            iptables,
            node,
            default_scheduler,
            sync: IpvsSync::new(drain_timeout),
            rulesets: [RulesetSync::new(ownership()), RulesetSync::new(ownership())],
            assemblers: [None, None],
            node_ips: None,
        }
    }

    fn read_node_ips(&self) -> Result<Vec<IpAddr>> {
        Ok(self
            .backends
            .addresses
            .node_ips(&self.node.nodeport_addresses)?)
    }

    fn sync_family(&mut self, family: IpFamily, changes: &Changes) -> Result<usize> {
        let i = family as usize;
        if let Scope::Full { .. } = changes.scope {
            let node_ips: Vec<IpAddr> = self
                .node_ips
                .iter()
                .flatten()
                .filter(|ip| IpFamily::of(**ip) == family)
                .copied()
                .collect();
            self.assemblers[i] = Some(IpvsAssembler::new(
                family,
                &node_ips,
                &self.default_scheduler,
            ));
        }
        let Some(assembler) = self.assemblers[i].as_mut() else {
            return Ok(0); // Only after a failed full sync, which the next full sync mends.
        };
        for (key, plans) in changes.services {
            assembler.replace(key, plans);
        }
        assembler.set_health_check_ports(changes.health_check_ports);
        let touched = assembler.take_touched();
        let scope = match changes.scope {
            Scope::Full { reread } => IpvsScope::Full { reread },
            Scope::Partial => IpvsScope::Partial(&touched),
        };
        self.sync.sync(
            &self.backends,
            &mut self.rulesets[i],
            self.iptables.as_ref(),
            assembler.desired(),
            scope,
        )
    }

    /// After a failure what the kernel holds is unknown: the next (full) sync reads it.
    fn forget(&mut self) {
        self.assemblers = [None, None];
        self.sync.forget();
    }
}

impl Proxier for IpvsProxier {
    fn begin(&mut self, scope: Scope) -> Result<()> {
        if scope == (Scope::Full { reread: true }) {
            self.sync.forget();
        }
        if matches!(scope, Scope::Full { .. }) || self.node_ips.is_none() {
            self.node_ips = Some(self.read_node_ips().inspect_err(|_| self.forget())?);
        }
        Ok(())
    }

    fn sync(&mut self, family: IpFamily, changes: &Changes) -> Result<usize> {
        self.sync_family(family, changes)
            .inspect_err(|_| self.forget())
    }

    fn drifted(&mut self) -> Option<String> {
        if let Some(why) = kube_chains::jumps_drifted(&self.rulesets, self.iptables.as_ref()) {
            return Some(why);
        }
        // A changed node address opens (or closes) NodePorts: a full sync does it.
        match self.read_node_ips() {
            Ok(ips) if Some(&ips) == self.node_ips.as_ref() => None,
            Ok(ips) => Some(format!("the node's addresses changed to {ips:?}")),
            Err(e) => Some(format!("could not read the node's addresses: {e}")),
        }
    }

    fn housekeeping(&mut self) {
        if let Err(e) = self.sync.sweep(&self.backends) {
            tracing::warn!(error = %e, "could not check the draining real servers");
            self.sync.forget();
        }
    }
}

/// The IPVS sysctls kube-proxy sets: connection tracking for IPVS traffic (without it
/// hairpin and cross-node NodePorts break: MASQUERADE never sees them), dropping
/// connections to removed servers, and conn_reuse_mode as kube-proxy picks it per
/// kernel (kubernetes#70747, #93297: 0 below 5.9, where 1 stalls reused ports for a
/// second; left at 1 from 5.9 on).
pub fn sysctls(kernel_release: &str) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![
        ("net.ipv4.vs.conntrack", "1"),
        ("net.ipv4.vs.expire_nodest_conn", "1"),
        ("net.ipv4.vs.expire_quiescent_template", "1"),
        ("net.ipv4.ip_forward", "1"),
    ];
    let mut parts = kernel_release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version >= (4, 1) {
        out.push((
            "net.ipv4.vs.conn_reuse_mode",
            if version < (5, 9) { "0" } else { "1" },
        ));
    }
    out
}

/// Sets `sysctls` for this kernel; a failure is logged, not fatal (a read-only /proc
/// in a test, a kernel without the key).
pub fn set_sysctls() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    for (key, value) in sysctls(release.trim()) {
        match calyx_dataplane::sysctl::set(key, value) {
            Ok(()) => tracing::debug!(key, value, "sysctl set"),
            Err(e) => tracing::warn!(error = %e, "could not set sysctl"),
        }
    }
}

/// Removes everything this mode made: its virtual services (those on kube-ipvs0
/// /// Removes everything this mode made: its virtual services (those on kube-ipvs0
/// addresses), rules, sets, and
/// kube-ipvs0. Parts that are missing are skipped; each failure is logged.
pub fn remove_all(
    virtual_services: Option<&dyn ipvs::Backend>,
    sets: &dyn ipset::Backend,
    kube_ipvs0: &dyn Addresses,
    iptables_backend: &dyn ipt::Backend,
    keep_shared_chains: bool,
) {
    let addresses = match kube_ipvs0.held() {
        Ok(a) => a.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read {DUMMY}");
            BTreeSet::new()
        }
    };
    if let Some(Ok(current)) = virtual_services.map(|v| v.dump()) {
        let ops: Vec<ipvs::Op> = current
            .keys()
            .filter(|id| addresses.contains(&id.address.ip()))
            .map(|id| ipvs::Op::DeleteService(*id))
            .collect();
        if !ops.is_empty() {
            match virtual_services.map(|v| v.apply(&ops)).unwrap_or(Ok(())) {
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
        let mut sync = RulesetSync::new(owner.clone());
        if let Err(e) = sync.sync(iptables_backend, &Ruleset::new(family), true) {
            tracing::warn!(%family, error = %e, "could not remove the IPVS mode's chains");
        }
    }
    if let Err(e) = IpsetSync::new(owns_set).sync(sets, &[], true) {
        tracing::warn!(error = %e, "could not remove the IPVS mode's ipsets");
    }
    if let Err(e) = kube_ipvs0.remove_device() {
        tracing::warn!(error = %e, "could not remove {DUMMY}");
    }
}
