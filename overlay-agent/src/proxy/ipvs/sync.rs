//! Writes IPVS mode's wanted state: what differs from the kernel, sets first (the
//! rules match them), then rules, then kube-ipvs0's addresses and the virtual
//! services. A real server that goes away is drained, not cut: weight 0 until its
//! connections end or `drain_timeout` passes (kubernetes#57841).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use calyx_dataplane::firewall::ipset::{self, IpsetSync};
use calyx_dataplane::firewall::iptables::{self as ipt, RulesetSync};
use calyx_dataplane::firewall::IpFamily;
use calyx_dataplane::ipvs::{self, RealServer, ServiceId, Services};

use super::addresses::Addresses;
use super::desired::{owns_set, owns_set_v4, owns_set_v6, Desired, IpvsTouched};
use crate::proxy::proxier::Result;

pub struct IpvsBackends {
    pub ipvs: Box<dyn ipvs::Backend>,
    pub ipset: Box<dyn ipset::Backend>,
    pub addresses: Box<dyn Addresses>,
}

/// Keeps IPVS, the sets and kube-ipvs0's addresses as wanted, per family; drains real
/// servers that go away.
pub struct IpvsSync {
    /// What the kernel held after the last write (None: read it again).
    services: Option<Services>,
    sets: [IpsetSync; 2],
    /// Both families' sets, read with one `ipset save` (a listing grows with the
    /// Services), each family's taken by its next full sync.
    sets_read: [Option<ipset::HeldSets>; 2],
    addresses: Option<BTreeSet<IpAddr>>,
    /// Real servers being drained, and since when.
    draining: HashMap<(ServiceId, SocketAddr), Instant>,
    pub drain_timeout: Duration,
}

/// Kubernetes' default --service-node-port-range: a virtual service on a node address
/// in it is taken to be a NodePort this mode opened (one whose Service went away).
const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Whether a virtual service is this mode's: one on a Service address (kube-ipvs0),
/// or a NodePort on a node address (one wanted, or one in the NodePort range whose
/// Service went away). Others (fwmark services, another tool's) are never touched.
fn owned(id: &ServiceId, addresses: &BTreeSet<IpAddr>, want: &Desired) -> bool {
    addresses.contains(&id.address.ip())
        || (want.node_ips.contains(&id.address.ip())
            && (want.services.contains_key(id) || NODE_PORT_RANGE.contains(&id.address.port())))
}

/// How much of the wanted state a sync compares with the kernel.
#[derive(Debug, Clone, Copy)]
pub enum IpvsScope<'a> {
    /// All of it (`reread`: read the kernel first, not what was last written).
    Full { reread: bool },
    /// What changed: the rest is as the last sync left it.
    Partial(&'a IpvsTouched),
}

impl IpvsSync {
    pub fn new(drain_timeout: Duration) -> IpvsSync {
        IpvsSync {
            services: None,
            sets: [IpsetSync::new(owns_set_v4), IpsetSync::new(owns_set_v6)],
            sets_read: [None, None],
            addresses: None,
            draining: HashMap::new(),
            drain_timeout,
        }
    }

    /// Forgets what was written: the next sync reads the kernel (a full sync calls it
    /// once, before either family).
    pub fn forget(&mut self) {
        self.services = None;
        self.addresses = None;
        self.sets_read = [None, None];
    }

    #[cfg(test)]
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    /// Writes `want` (one family's), all of it or what `scope` says changed; returns
    /// how many kernel writes it took. Sets first (the rules match them), then rules,
    /// then addresses and services.
    pub fn sync(
        &mut self,
        backends: &IpvsBackends,
        iptables: &mut RulesetSync,
        iptables_backend: &dyn ipt::Backend,
        want: &Desired,
        scope: IpvsScope,
    ) -> Result<usize> {
        let family = want.ruleset.family;
        let in_family = |ip: &IpAddr| IpFamily::of(*ip) == family;
        let mut writes = 0;
        let i = family as usize;
        let t0 = Instant::now();
        let script = match scope {
            // Nothing known (a start) or a re-read asked for: both families' sets are
            // read with the first family's sync.
            IpvsScope::Full { reread } if reread || !self.sets[i].knows_kernel() => {
                if self.sets_read[i].is_none() {
                    tracing::debug!(%family, "reading both families' ipsets");
                    let held = backends.ipset.dump(owns_set)?;
                    let (v4, v6) = held.into_iter().partition(|(name, _)| owns_set_v4(name));
                    self.sets_read = [Some(v4), Some(v6)];
                }
                let held = self.sets_read[i].take().unwrap_or_default();
                self.sets[i].start_from(held);
                self.sets[i].sync(backends.ipset.as_ref(), &want.sets, false)?
            }
            IpvsScope::Full { .. } => {
                self.sets[i].sync(backends.ipset.as_ref(), &want.sets, false)?
            }
            IpvsScope::Partial(touched) => {
                let entries = touched
                    .entries
                    .iter()
                    .map(|(set, entry)| (want.sets[*set].name.as_str(), entry.as_str()));
                self.sets[i].sync_entries(backends.ipset.as_ref(), &want.sets, entries)?
            }
        };
        writes += script.len();
        let t_sets = t0.elapsed();
        // The rules are fixed (the sets carry the Services): only a full sync looks.
        if let IpvsScope::Full { reread } = scope {
            let tx = iptables.sync(iptables_backend, &want.ruleset, reread)?;
            writes += tx.tables.iter().map(|(_, ops)| ops.len()).sum::<usize>();
        }
        let t_rules = t0.elapsed();

        // Addresses and virtual services: both families' are read together, once per
        // full sync (the caller's `forget`): a read is a request per Service.
        if self.addresses.is_none() {
            let held = match backends.addresses.held()? {
                Some(held) => held,
                None => {
                    backends.addresses.create_device()?;
                    BTreeSet::new()
                }
            };
            self.addresses = Some(held);
        }
        let held = self.addresses.as_mut().expect("read above");
        let missing: Vec<IpAddr> = match scope {
            IpvsScope::Full { .. } => want
                .addresses
                .difference(held)
                .filter(|ip| in_family(ip))
                .copied()
                .collect(),
            IpvsScope::Partial(touched) => touched
                .addresses
                .iter()
                .filter(|ip| want.addresses.contains(ip) && !held.contains(ip))
                .copied()
                .collect(),
        };
        if let Err(e) = backends.addresses.add(&missing) {
            self.addresses = None; // Some may have been added: read them again.
            return Err(e.into());
        }
        held.extend(&missing);
        writes += missing.len();
        let t_addresses = t0.elapsed();

        if self.services.is_none() {
            self.services = Some(backends.ipvs.dump()?);
        }
        let current = self.services.as_mut().expect("read above");
        let t_dump = t0.elapsed();
        // The services to compare: all of this family's (held or wanted) on a full
        // sync, the changed ones otherwise.
        let ids: BTreeSet<ServiceId> = match scope {
            IpvsScope::Full { .. } => current
                .keys()
                .chain(want.services.keys())
                .filter(|id| in_family(&id.address.ip()))
                .copied()
                .collect(),
            IpvsScope::Partial(touched) => touched.services.clone(),
        };
        // What is ours: services on kube-ipvs0's addresses (as held, so one whose
        // Service went is found), and NodePorts on node addresses. A changed service
        // was or is wanted: ours.
        let addresses = self.addresses.as_ref().expect("read above");
        let is_ours = |id: &ServiceId| match scope {
            IpvsScope::Full { .. } => in_family(&id.address.ip()) && owned(id, addresses, want),
            IpvsScope::Partial(_) => true,
        };
        let mut target: Services = ids
            .iter()
            .filter_map(|id| want.services.get(id).map(|s| (*id, s.clone())))
            .collect();
        let now = Instant::now();
        // Drain: a real server that goes from a service that stays keeps weight 0
        // while it has connections (TCP and SCTP; UDP has no end to wait for).
        let mut drained: Vec<(ServiceId, SocketAddr)> = Vec::new();
        for (id, wanted) in target.iter_mut() {
            let Some(held) = current.get(id) else {
                continue;
            };
            if !is_ours(id) {
                continue;
            }
            for (rs, server) in &held.servers {
                if wanted.servers.contains_key(rs) {
                    self.draining.remove(&(*id, *rs));
                    continue;
                }
                if id.protocol == ipvs::Protocol::Udp {
                    continue;
                }
                // Kept at weight 0 until `sweep`, which reads fresh connection counts,
                // finds it idle (the counts held here may be old), or its time is up.
                let since = *self.draining.entry((*id, *rs)).or_insert(now);
                if now.duration_since(since) < self.drain_timeout {
                    wanted.servers.insert(
                        *rs,
                        RealServer {
                            weight: 0,
                            ..*server
                        },
                    );
                } else {
                    drained.push((*id, *rs));
                }
            }
        }
        for key in drained {
            self.draining.remove(&key);
        }
        // A service that goes takes its draining servers with it.
        self.draining
            .retain(|(id, _), _| !ids.contains(id) || target.contains_key(id));
        let ops = ipvs::plan_only(&ids, current, &target, is_ours);
        let t_plan = t0.elapsed();
        if !ops.is_empty() {
            let result = backends.ipvs.apply(&ops);
            ipvs::apply_to(current, &ops);
            if let Err(e) = result {
                self.services = None;
                return Err(e.into());
            }
            writes += ops.len();
        }

        // Addresses last: a Service address goes after its virtual services.
        let held = self.addresses.as_mut().expect("read above");
        let stale: Vec<IpAddr> = match scope {
            IpvsScope::Full { .. } => held
                .iter()
                .filter(|ip| in_family(ip) && !want.addresses.contains(ip))
                .copied()
                .collect(),
            IpvsScope::Partial(touched) => touched
                .addresses
                .iter()
                .filter(|ip| held.contains(ip) && !want.addresses.contains(ip))
                .copied()
                .collect(),
        };
        if let Err(e) = backends.addresses.remove(&stale) {
            self.addresses = None;
            return Err(e.into());
        }
        for ip in &stale {
            held.remove(ip);
        }
        writes += stale.len();
        tracing::debug!(%family, sets = ?t_sets, rules = ?t_rules, addresses = ?t_addresses, dump = ?t_dump, plan = ?t_plan, services = ?t0.elapsed(), ops = ops.len(), "ipvs sync phases (cumulative)");
        Ok(writes)
    }

    /// Reads the connection counts of the servers being drained (only their services)
    /// and removes those that have none left (or whose time is up). Returns how many
    /// were removed.
    pub fn sweep(&mut self, backends: &IpvsBackends) -> Result<usize> {
        if self.draining.is_empty() {
            return Ok(0);
        }
        let services: BTreeSet<ServiceId> = self.draining.keys().map(|(id, _)| *id).collect();
        let mut held = BTreeMap::new();
        for id in services {
            held.insert(id, backends.ipvs.servers(&id)?);
        }
        let now = Instant::now();
        let mut ops = Vec::new();
        self.draining.retain(|(id, rs), since| {
            let Some(server) = held.get(id).and_then(|s| s.get(rs)) else {
                return false;
            };
            if server.weight > 0 {
                return false; // Wanted again.
            }
            let done = server.active + server.inactive == 0
                || now.duration_since(*since) >= self.drain_timeout;
            if done {
                ops.push(ipvs::Op::DeleteServer(*id, *rs));
            }
            !done
        });
        if !ops.is_empty() {
            let result = backends.ipvs.apply(&ops);
            if let Some(services) = self.services.as_mut() {
                ipvs::apply_to(services, &ops);
            }
            result?;
            tracing::info!(removed = ops.len(), "drained real servers removed");
        }
        Ok(ops.len())
    }
}
