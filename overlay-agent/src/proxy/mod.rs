//! The service proxy controller: makes Services reachable without kube-proxy. A source
//! (the Kubernetes API or a directory) publishes snapshots of the model; each run works
//! out which Services changed and their port plans, and hands them to the mode's
//! proxier (`proxier::Proxier`: nftables, iptables or IPVS), which writes only what
//! differs from what the kernel holds. What every mode shares stays here: the changed
//! Services, health-check servers, UDP conntrack clean-up and metrics. It never
//! imports the overlay, and no mode imports another.

pub mod conntrack;
pub mod health;
pub mod iptables;
pub mod ipvs;
pub mod kube_chains;
pub mod model;
pub mod nftables;
pub mod node;
pub mod proxier;
pub mod source;
#[cfg(test)]
mod testing;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use calyx_dataplane::device_addresses::DeviceAddresses;
use calyx_dataplane::firewall::ipset::IpsetCommand;
use calyx_dataplane::firewall::iptables::{Backend as _, IptablesCommand};
use calyx_dataplane::firewall::nft::{Backend as _, NftCommand};
use calyx_dataplane::firewall::IpFamily;
use clap::ValueEnum;
use ipnetwork::IpNetwork;

use crate::metrics::Metrics;
use crate::runtime::{Controller, Trigger};
use model::{PortPlan, ProxyState, ServiceKey};
use node::NodeSettings;
use proxier::{Changes, Proxier, ProxierError, Scope, ServiceUpdate};
use source::Snapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    Off,
    Nftables,
    Iptables,
    Ipvs,
}

pub struct ProxyConfig {
    pub mode: ProxyMode,
    pub node_name: String,
    pub nodeport_addresses: Vec<IpNetwork>,
    /// IPVS mode: the scheduler of Services that name none.
    pub ipvs_scheduler: String,
    /// IPVS mode: how long a removed real server may drain its connections.
    pub ipvs_drain: std::time::Duration,
}

/// Why the service proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the service proxy is off: nothing to start")]
    Off,
    #[error(transparent)]
    Ipvs(#[from] calyx_dataplane::ipvs::IpvsError),
    #[error(transparent)]
    Netlink(#[from] calyx_dataplane::DataplaneError),
}

/// The kernel's proxier for `config.mode`, reading what the kernel holds for its first
/// sync on another thread meanwhile; None for `off`. IPVS mode fails here when the
/// kernel has no IPVS.
fn kernel_proxier(config: &ProxyConfig) -> Result<Option<Box<dyn Proxier>>, ProxyError> {
    let node = NodeSettings {
        nodeport_addresses: config.nodeport_addresses.clone(),
    };
    Ok(Some(match config.mode {
        ProxyMode::Off => return Ok(None),
        ProxyMode::Nftables => {
            let mut proxier = nftables::NftablesProxier::new(Box::new(NftCommand), node);
            proxier.prefetch(|| {
                IpFamily::BOTH.map(|family| NftCommand.dump(family.into(), nftables::TABLE))
            });
            Box::new(proxier)
        }
        ProxyMode::Iptables => {
            let mut proxier =
                iptables::IptablesProxier::new(Box::new(IptablesCommand::host()), node);
            proxier.prefetch(|| {
                let owner = iptables::chains::ownership();
                IpFamily::BOTH.map(|family| IptablesCommand::host().dump(family, &owner))
            });
            Box::new(proxier)
        }
        ProxyMode::Ipvs => {
            ipvs::set_sysctls();
            let backends = ipvs::sync::IpvsBackends {
                ipvs: Box::new(calyx_dataplane::ipvs::IpvsNetlink::open()?),
                ipset: Box::new(IpsetCommand),
                addresses: Box::new(DeviceAddresses::open(ipvs::DUMMY)?),
            };
            Box::new(ipvs::IpvsProxier::new(
                backends,
                Box::new(IptablesCommand::host()),
                node,
                config.ipvs_scheduler.clone(),
                config.ipvs_drain,
            ))
        }
    }))
}

/// What a sync left programmed, and how many kernel writes (transaction steps) it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Programmed {
    pub ports: usize,
    pub endpoints: usize,
    pub writes: usize,
}

pub struct ProxyController {
    node: String,
    snapshot: Snapshot,
    proxier: Box<dyn Proxier>,
    /// Whether to delete stale UDP conntrack entries (not on fakes).
    conntrack: bool,
    /// The plans last written, per family and Service: what conntrack cleanup and the
    /// next change compare against.
    applied: [HashMap<ServiceKey, Vec<PortPlan>>; 2],
    /// The snapshot last written in full; None until then and after a failed write
    /// (the next run is then a full one).
    applied_state: Option<Arc<ProxyState>>,
    health: health::HealthServers,
    metrics: Arc<Metrics>,
    synced: Arc<AtomicBool>,
    /// Trigger times already measured, per slice (slices that go keep theirs: a few
    /// bytes each, and a slice that comes back under the same name is measured again
    /// only when its time moved).
    trigger_times: HashMap<ServiceKey, f64>,
    /// healthCheckNodePort and local endpoint count, per eTP Local Service.
    health_checks: BTreeMap<ServiceKey, (u16, usize)>,
}

impl ProxyController {
    /// Removes the other modes' objects and returns the controller, reading `snapshot`
    /// (from one of the agent's sources, `crate::source`).
    pub fn start(
        config: ProxyConfig,
        metrics: Arc<Metrics>,
        snapshot: Snapshot,
    ) -> Result<ProxyController, ProxyError> {
        let Some(proxier) = kernel_proxier(&config)? else {
            return Err(ProxyError::Off);
        };
        tokio::task::block_in_place(|| remove_other_modes(config.mode));
        Ok(ProxyController::new(
            config.node_name,
            proxier,
            true,
            snapshot,
            metrics,
        ))
    }

    pub fn new(
        node: String,
        proxier: Box<dyn Proxier>,
        conntrack: bool,
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
    ) -> ProxyController {
        let synced = Arc::new(AtomicBool::new(false));
        {
            let synced = synced.clone();
            metrics.add_readiness_check(move || {
                (!synced.load(Ordering::Relaxed))
                    .then(|| "the service proxy has not synced yet".to_string())
            });
        }
        ProxyController {
            node,
            snapshot,
            proxier,
            conntrack,
            applied: [HashMap::new(), HashMap::new()],
            applied_state: None,
            health: health::HealthServers::default(),
            metrics,
            synced,
            trigger_times: HashMap::new(),
            health_checks: BTreeMap::new(),
        }
    }

    /// One sync; returns what is programmed, or None before the source has listed
    /// everything once.
    fn sync(&mut self, full: bool) -> Result<Option<Programmed>, ProxierError> {
        let Some(state) = self.snapshot.borrow().clone() else {
            return Ok(None);
        };
        // Nothing changed since the last write and no re-read asked for: done.
        if !full
            && self
                .applied_state
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, &state))
        {
            return Ok(Some(self.programmed(0)));
        }
        // A full run (start, resync, after a failure) recomputes every Service and
        // compares everything with the kernel; otherwise only the Services whose
        // objects changed. A new zone for this node can change every Service's
        // endpoints (hints).
        let changed = match &self.applied_state {
            Some(before) if !full && before.node_zone == state.node_zone => {
                Some(state.changed_services(before))
            }
            _ => None,
        };
        let scope = match changed {
            Some(_) => Scope::Partial,
            None => Scope::Full { reread: full },
        };
        // The slices of the Services to recompute (all of them on a full run).
        let mut slices: HashMap<&ServiceKey, Vec<&Arc<model::Slice>>> = HashMap::new();
        let mut new_slices: Vec<(&ServiceKey, &model::Slice)> = Vec::new();
        for (slice_key, slice) in &state.slices {
            if changed.as_ref().is_none_or(|c| c.contains(&slice.service)) {
                slices.entry(&slice.service).or_default().push(slice);
                new_slices.push((slice_key, slice));
            }
        }
        self.update_health_checks(&state, changed.as_ref(), &slices);
        // Per family: the Services to recompute (every one held or wanted on a full
        // run) and their new plans.
        let mut updates: [Vec<ServiceUpdate>; 2] = [Vec::new(), Vec::new()];
        let mut stale: [BTreeSet<conntrack::Deletion>; 2] = Default::default();
        for (i, family) in IpFamily::BOTH.into_iter().enumerate() {
            let keys: Vec<ServiceKey> = match &changed {
                Some(keys) => keys.iter().cloned().collect(),
                None => {
                    let mut all: Vec<ServiceKey> = state.services.keys().cloned().collect();
                    all.extend(self.applied[i].keys().cloned());
                    all.sort();
                    all.dedup();
                    all
                }
            };
            for key in keys {
                let plans = state
                    .services
                    .get(&key)
                    .map(|svc| {
                        let own = slices.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                        let here = model::Here {
                            node: &self.node,
                            zone: state.node_zone.as_deref(),
                        };
                        model::service_port_plans(svc, own, here, family)
                    })
                    .unwrap_or_default();
                let before = self.applied[i].get(&key).map(Vec::as_slice).unwrap_or(&[]);
                stale[i].extend(conntrack::stale_udp(before, &plans));
                updates[i].push((key, plans));
            }
        }
        let health_check_ports: Vec<u16> =
            self.health_checks.values().map(|(port, _)| *port).collect();
        let writes = self.write(scope, updates, stale, &health_check_ports)?;
        self.observe_programming_latency(&new_slices, changed.is_none());
        self.applied_state = Some(state);
        Ok(Some(self.programmed(writes)))
    }

    /// Hands the changes to the proxier, a family at a time, and clears each family's
    /// stale UDP flows as soon as it is written; records what was written. A failure
    /// leaves the next run a full one.
    fn write(
        &mut self,
        scope: Scope,
        updates: [Vec<ServiceUpdate>; 2],
        stale: [BTreeSet<conntrack::Deletion>; 2],
        health_check_ports: &[u16],
    ) -> Result<usize, ProxierError> {
        let mut writes = 0;
        let written = self.proxier.begin(scope).and_then(|()| {
            for (family, (services, stale)) in
                IpFamily::BOTH.into_iter().zip(updates.iter().zip(&stale))
            {
                writes += self.proxier.sync(
                    family,
                    &Changes {
                        scope,
                        services,
                        health_check_ports,
                    },
                )?;
                if self.conntrack && !stale.is_empty() {
                    conntrack::delete(stale);
                }
            }
            Ok(())
        });
        if let Err(e) = written {
            // What the kernel holds is unknown: the next run starts over.
            self.applied_state = None;
            return Err(e);
        }
        for (applied, family_updates) in self.applied.iter_mut().zip(updates) {
            for (key, plans) in family_updates {
                if plans.is_empty() {
                    applied.remove(&key);
                } else {
                    applied.insert(key, plans);
                }
            }
        }
        Ok(writes)
    }

    /// Recomputes the health checks of the changed Services (all on a full run) and
    /// updates the health-check servers.
    fn update_health_checks(
        &mut self,
        state: &ProxyState,
        changed: Option<&BTreeSet<ServiceKey>>,
        slices: &HashMap<&ServiceKey, Vec<&Arc<model::Slice>>>,
    ) {
        let keys: Vec<&ServiceKey> = match changed {
            Some(keys) => keys.iter().collect(),
            None => {
                self.health_checks.clear();
                state.services.keys().collect()
            }
        };
        for key in keys {
            let check = state.services.get(key).and_then(|svc| {
                let own = slices.get(key).map(Vec::as_slice).unwrap_or(&[]);
                model::health_check(svc, own, &self.node)
            });
            match check {
                Some(c) => self.health_checks.insert(key.clone(), c),
                None => self.health_checks.remove(key),
            };
        }
        let wanted = self
            .health_checks
            .iter()
            .map(|(key, (port, count))| (*port, (key.clone(), *count)))
            .collect();
        self.health.update(&wanted);
    }

    /// The periodic check: whether the kernel lost anything the proxier wrote. Only a
    /// synced proxy checks.
    fn check_kernel_drift(&mut self) -> bool {
        if self.applied_state.is_none() {
            return false;
        }
        let Some(why) = self.proxier.drifted() else {
            return false;
        };
        tracing::warn!(
            why,
            "the kernel no longer holds what the service proxy wrote; syncing everything"
        );
        true
    }

    fn programmed(&self, writes: usize) -> Programmed {
        let plans = || self.applied.iter().flat_map(|m| m.values().flatten());
        Programmed {
            ports: plans().count(),
            endpoints: plans().map(|p| p.all_endpoints().count()).sum(),
            writes,
        }
    }

    /// Network-programming latency: from each changed slice's new trigger time to now.
    /// A full run (a start) measures nothing: those changes are old.
    fn observe_programming_latency(&mut self, slices: &[(&ServiceKey, &model::Slice)], full: bool) {
        let now = epoch_seconds();
        if full {
            self.trigger_times.clear();
        }
        for (key, slice) in slices {
            let Some(t) = slice.trigger_time else {
                continue;
            };
            let previous = self.trigger_times.insert((*key).clone(), t);
            if !full && previous != Some(t) && now >= t {
                self.metrics
                    .proxy
                    .network_programming_seconds
                    .observe(now - t);
            }
        }
    }
}

impl Controller for ProxyController {
    fn name(&self) -> &'static str {
        "proxy"
    }

    async fn reconcile(&mut self, trigger: Trigger, full: bool) -> bool {
        let started = Instant::now();
        let outcome = tokio::task::block_in_place(|| {
            let full = full || (trigger == Trigger::Check && self.check_kernel_drift());
            if trigger == Trigger::Check {
                self.proxier.housekeeping();
            }
            self.sync(full)
        });
        let elapsed = started.elapsed().as_secs_f64();
        let m = &self.metrics.proxy;
        match outcome {
            Ok(None) => {
                tracing::debug!("waiting for the first listing of Services and EndpointSlices");
                true
            }
            Ok(Some(Programmed {
                ports,
                endpoints,
                writes,
            })) => {
                if full {
                    m.full_sync_seconds.observe(elapsed);
                } else {
                    m.partial_sync_seconds.observe(elapsed);
                }
                m.services.set(ports as i64);
                m.endpoints.set(endpoints as i64);
                m.last_sync_timestamp.set(epoch_seconds());
                let first = !self.synced.swap(true, Ordering::Relaxed);
                if first || writes > 0 {
                    tracing::info!(
                        ?trigger,
                        first,
                        ports,
                        endpoints,
                        writes,
                        elapsed_ms = elapsed * 1e3,
                        "service proxy synced"
                    );
                } else {
                    tracing::debug!(
                        ?trigger,
                        ports,
                        endpoints,
                        elapsed_ms = elapsed * 1e3,
                        "service proxy synced, nothing to write"
                    );
                }
                true
            }
            Err(e) => {
                m.sync_errors.inc();
                tracing::error!(
                    ?trigger,
                    error = format!("{e:#}"),
                    "service proxy sync failed; will retry"
                );
                false
            }
        }
    }
}

/// Now, in seconds since the epoch with a fraction (trigger times and the metric's
/// timestamp are compared at sub-second precision, which `calyx_ipam::unix_now` lacks).
fn epoch_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Switching modes: what the other modes wrote goes at start. (IPVS mode owns the
/// iptables mode's chains too: its first sync replaces them in one transaction.)
fn remove_other_modes(mode: ProxyMode) {
    if mode != ProxyMode::Nftables {
        nftables::remove_all(&NftCommand);
    }
    if mode == ProxyMode::Nftables {
        iptables::remove_all(&IptablesCommand::host());
    }
    if mode != ProxyMode::Ipvs {
        remove_ipvs_leftovers(mode == ProxyMode::Iptables);
    }
}

/// IPVS mode's objects when another mode runs: only when kube-ipvs0 is there (a host
/// that never ran IPVS mode pays nothing). `keep_shared_chains`: iptables mode keeps
/// the chains it shares with IPVS mode (its own sync rewrites them).
fn remove_ipvs_leftovers(keep_shared_chains: bool) {
    use calyx_dataplane::ipvs::IpvsNetlink;
    let addresses = match DeviceAddresses::open(ipvs::DUMMY) {
        Ok(addresses) => addresses,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for what IPVS mode left");
            return;
        }
    };
    if !matches!(addresses.held(), Ok(Some(_))) {
        return;
    }
    tracing::info!("removing what IPVS mode left (kube-ipvs0 is present)");
    let netlink = IpvsNetlink::open()
        .inspect_err(|e| tracing::warn!(error = %e, "IPVS virtual services left as they are"))
        .ok();
    ipvs::remove_all(
        netlink
            .as_ref()
            .map(|n| n as &dyn calyx_dataplane::ipvs::Backend),
        &IpsetCommand,
        &addresses,
        &IptablesCommand::host(),
        keep_shared_chains,
    );
}

/// At start with --proxy-mode off: remove the nftables table a previous run left. The
/// iptables chains carry kube-proxy's names and may be kube-proxy's own: left alone.
pub fn cleanup_stale() {
    nftables::remove_all(&NftCommand);
}

/// `--proxy-cleanup`: everything any mode created, as `kube-proxy --cleanup` does.
/// Each part that cannot be removed is logged; the others are still removed.
pub fn cleanup_all() {
    nftables::remove_all(&NftCommand);
    iptables::remove_all(&IptablesCommand::host());
    remove_ipvs_leftovers(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{endpoint, key, service, slice, slice_mut, state, FakeAddresses};
    use calyx_dataplane::firewall::ipset::{self, RecordingIpset};
    use calyx_dataplane::firewall::iptables::RecordingIptables;
    use calyx_dataplane::firewall::nft::{self, RecordingNft};
    use calyx_dataplane::firewall::FirewallError;
    use calyx_dataplane::ipvs::RecordingIpvs;
    use std::sync::atomic::AtomicUsize;

    /// The ipset fake, counting how often the sets are read.
    #[derive(Default)]
    struct CountingIpset {
        sets: RecordingIpset,
        reads: AtomicUsize,
    }

    impl ipset::Backend for CountingIpset {
        fn dump(&self, owns: ipset::Owns) -> Result<ipset::HeldSets, FirewallError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.sets.dump(owns)
        }
        fn apply(&self, ops: &[ipset::SetOp]) -> Result<(), FirewallError> {
            self.sets.apply(ops)
        }
    }

    /// Every fake kernel part a proxier may write to.
    #[derive(Default)]
    struct FakeKernel {
        nft: Arc<RecordingNft>,
        iptables: Arc<RecordingIptables>,
        ipvs: Arc<RecordingIpvs>,
        sets: Arc<CountingIpset>,
        addresses: Arc<FakeAddresses>,
    }

    const MODES: [ProxyMode; 3] = [ProxyMode::Nftables, ProxyMode::Iptables, ProxyMode::Ipvs];

    fn node() -> NodeSettings {
        NodeSettings {
            nodeport_addresses: vec!["192.0.2.11/32".parse().unwrap()],
        }
    }

    fn proxier(mode: ProxyMode, kernel: &FakeKernel) -> Box<dyn Proxier> {
        match mode {
            ProxyMode::Nftables => Box::new(nftables::NftablesProxier::new(
                Box::new(kernel.nft.clone()),
                node(),
            )),
            ProxyMode::Iptables => Box::new(iptables::IptablesProxier::new(
                Box::new(kernel.iptables.clone()),
                node(),
            )),
            ProxyMode::Ipvs => Box::new(ipvs::IpvsProxier::new(
                ipvs::sync::IpvsBackends {
                    ipvs: Box::new(kernel.ipvs.clone()),
                    ipset: Box::new(kernel.sets.clone()),
                    addresses: Box::new(kernel.addresses.clone()),
                },
                Box::new(kernel.iptables.clone()),
                node(),
                "rr".into(),
                std::time::Duration::from_secs(60),
            )),
            ProxyMode::Off => unreachable!("no proxier for off"),
        }
    }

    /// A controller of `mode` on a fresh fake kernel, and the way to hand it snapshots.
    fn controller(
        mode: ProxyMode,
    ) -> (
        ProxyController,
        crate::source::Publisher<ProxyState>,
        FakeKernel,
    ) {
        let (triggers, _rx) = crate::runtime::Triggers::channel();
        let (publisher, snapshot) = crate::source::Publisher::new(triggers);
        let kernel = FakeKernel::default();
        let metrics = Metrics::new(std::time::Duration::from_secs(10));
        let c = ProxyController::new(
            "n1".into(),
            proxier(mode, &kernel),
            false,
            snapshot,
            metrics,
        );
        (c, publisher, kernel)
    }

    /// What `mode` left in the fake kernel, in a form two kernels can be compared in
    /// (drained IPVS real servers, weight 0, are the kernel's until their connections
    /// end, and left out).
    fn held(mode: ProxyMode, kernel: &FakeKernel) -> String {
        let mut out = String::new();
        for family in IpFamily::BOTH {
            match mode {
                ProxyMode::Nftables => {
                    let table = kernel.nft.table(family, nftables::TABLE);
                    let table = table.as_ref().expect("the table is written");
                    let elements: BTreeMap<_, _> =
                        table.sets.iter().map(|(n, s)| (n, &s.elements)).collect();
                    out += &format!("{family} sets {elements:#?}\nchains {:#?}\n", table.chains);
                }
                ProxyMode::Iptables | ProxyMode::Ipvs => {
                    for t in ["nat", "filter"] {
                        out += &format!("{family} {t} {:#?}\n", kernel.iptables.chains(family, t));
                    }
                }
                ProxyMode::Off => {}
            }
        }
        if mode == ProxyMode::Ipvs {
            let mut services = kernel.ipvs.services();
            for service in services.values_mut() {
                service.servers.retain(|_, s| s.weight > 0);
            }
            let sets: BTreeMap<String, _> = IpFamily::BOTH
                .into_iter()
                .flat_map(|f| {
                    ipvs::desired::SETS
                        .iter()
                        .map(move |(n, _)| ipvs::desired::set_name(n, f))
                })
                .map(|name| {
                    let entries = kernel.sets.sets.set(&name);
                    (name, entries)
                })
                .collect();
            let addresses = kernel.addresses.0.lock().unwrap().clone();
            out += &format!("{services:#?}\n{sets:#?}\n{addresses:?}\n");
        }
        out
    }

    /// A change to the cluster, one step of a test.
    type Step = Box<dyn Fn(&mut ProxyState)>;

    /// Twenty Services with most of what a Service can be: NodePorts, an eTP Local one
    /// (no health check: that starts a server), affinity, a LoadBalancer with source ranges, dual-stack, and
    /// two that share an endpoint.
    fn cluster() -> ProxyState {
        let services = (0..20)
            .map(|i| {
                let mut s = service(&format!("s{i}"), &format!("10.96.0.{}", i + 1), 80);
                if i % 2 == 0 {
                    s.ports[0].node_port = Some(30000 + i);
                }
                match i {
                    5 => s.affinity_seconds = Some(30),
                    6 => s.external_local = true,
                    7 => {
                        s.load_balancer_ips = vec!["203.0.113.7".parse().unwrap()];
                        s.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
                    }
                    8 => s.cluster_ips.push("fd00:96::8".parse().unwrap()),
                    _ => {}
                }
                s
            })
            .collect();
        let slices = (0..20)
            .map(|i| {
                let mut endpoints = vec![endpoint(&format!("10.244.1.{}", i.max(1)), "n1")];
                if i == 8 {
                    endpoints.push(endpoint("fd00:10:244:1::8", "n1"));
                }
                slice(&format!("s{i}"), 8080, endpoints)
            })
            .collect();
        state(services, slices)
    }

    /// Endpoint counts change (maps and chains come and go), Services come and go,
    /// change their shape, and lose or regain every endpoint.
    fn changes() -> Vec<Step> {
        vec![
            Box::new(|st| {
                slice_mut(st, "s1")
                    .endpoints
                    .push(endpoint("10.244.2.9", "n2"))
            }),
            Box::new(|st| {
                slice_mut(st, "s1")
                    .endpoints
                    .push(endpoint("10.244.3.9", "n3"))
            }),
            Box::new(|st| slice_mut(st, "s2").endpoints.clear()),
            Box::new(|st| {
                st.services.remove(&key("s3"));
            }),
            Box::new(|st| {
                let mut s = service("s3", "10.96.0.99", 81);
                s.affinity_seconds = Some(30);
                st.services.insert(key("s3"), Arc::new(s));
            }),
            Box::new(|st| slice_mut(st, "s1").endpoints.truncate(1)),
            Box::new(|st| {
                st.slices.remove(&key("s4"));
            }),
            // The eTP Local Service's only endpoint moves to another node.
            Box::new(|st| slice_mut(st, "s6").endpoints = vec![endpoint("10.244.2.6", "n2")]),
            // The shared endpoint leaves one of its two Services, then the other.
            Box::new(|st| slice_mut(st, "s0").endpoints.clear()),
            Box::new(|st| {
                st.slices.remove(&key("s1"));
            }),
            // The LoadBalancer's ranges change; the dual-stack one loses its IPv6 endpoint.
            Box::new(|st| {
                let mut s = (*st.services[&key("s7")]).clone();
                s.load_balancer_source_ranges
                    .push("192.0.2.0/24".parse().unwrap());
                st.services.insert(key("s7"), Arc::new(s));
            }),
            Box::new(|st| slice_mut(st, "s8").endpoints.truncate(1)),
        ]
    }

    #[test]
    fn every_proxier_ends_each_change_as_a_full_sync_of_the_same_state_would() {
        for mode in MODES {
            let (mut c, publisher, kernel) = controller(mode);
            let mut st = cluster();
            publisher.publish(Arc::new(st.clone()));
            assert!(
                c.sync(false).unwrap().unwrap().writes > 0,
                "{mode:?}: first sync"
            );
            for (n, step) in changes().iter().enumerate() {
                step(&mut st);
                publisher.publish(Arc::new(st.clone()));
                let written = c.sync(false).unwrap().unwrap();
                assert!(written.writes > 0, "{mode:?} step {n}: nothing written");
                // The same state on a fresh kernel, in one full sync.
                let (mut whole, whole_publisher, whole_kernel) = controller(mode);
                whole_publisher.publish(Arc::new(st.clone()));
                whole.sync(true).unwrap().unwrap();
                assert_eq!(
                    held(mode, &kernel),
                    held(mode, &whole_kernel),
                    "{mode:?} step {n}: the kernel differs from a full sync's"
                );
            }
            // Nothing changed: nothing written, and a full sync finds nothing to write.
            publisher.publish(Arc::new(st.clone()));
            assert_eq!(c.sync(false).unwrap().unwrap().writes, 0, "{mode:?}");
            assert_eq!(c.sync(true).unwrap().unwrap().writes, 0, "{mode:?}");
        }
    }

    #[test]
    fn a_failed_write_is_followed_by_a_full_sync_that_mends_the_kernel() {
        for mode in [ProxyMode::Nftables, ProxyMode::Iptables] {
            let (mut c, publisher, kernel) = controller(mode);
            let mut st = cluster();
            publisher.publish(Arc::new(st.clone()));
            c.sync(false).unwrap().unwrap();
            // A change whose write fails: the next change must not build on it.
            kernel.nft.fail_next_apply();
            kernel.iptables.fail_next_apply();
            slice_mut(&mut st, "s1")
                .endpoints
                .push(endpoint("10.244.2.9", "n2"));
            publisher.publish(Arc::new(st.clone()));
            assert!(c.sync(false).is_err(), "{mode:?}: the write fails");
            slice_mut(&mut st, "s2").endpoints.clear();
            publisher.publish(Arc::new(st.clone()));
            c.sync(false).unwrap().unwrap();
            let (mut whole, whole_publisher, whole_kernel) = controller(mode);
            whole_publisher.publish(Arc::new(st.clone()));
            whole.sync(true).unwrap().unwrap();
            assert_eq!(held(mode, &kernel), held(mode, &whole_kernel), "{mode:?}");
        }
    }

    #[test]
    fn the_periodic_check_sees_a_table_deleted_by_hand() {
        let (mut c, publisher, kernel) = controller(ProxyMode::Nftables);
        assert!(
            !c.check_kernel_drift(),
            "nothing to check before the first sync"
        );
        let st = state(
            vec![service("web", "10.96.0.10", 80)],
            vec![slice("web", 8080, vec![endpoint("10.244.1.2", "n1")])],
        );
        publisher.publish(Arc::new(st));
        c.sync(true).unwrap().unwrap();
        assert!(!c.check_kernel_drift());
        nft::Backend::apply(
            kernel.nft.as_ref(),
            &nft::Transaction {
                family: IpFamily::V4.into(),
                table: nftables::TABLE.into(),
                ops: vec![nft::Op::DeleteTable],
            },
        )
        .unwrap();
        assert!(c.check_kernel_drift());
        assert!(c.sync(true).unwrap().unwrap().writes > 0);
        assert!(!c.check_kernel_drift());
    }

    #[test]
    fn ipvs_mode_reads_the_sets_once_per_full_sync_and_a_change_looks_only_at_what_it_touched() {
        let (mut c, publisher, kernel) = controller(ProxyMode::Ipvs);
        let mut st = cluster();
        publisher.publish(Arc::new(st.clone()));
        // The first run (a Source trigger, not a re-read) reads the sets once too.
        assert!(c.sync(false).unwrap().unwrap().writes > 0);
        assert_eq!(
            kernel.sets.reads.load(Ordering::SeqCst),
            1,
            "one read at the first sync"
        );
        let set_entries = |name: &str| kernel.sets.sets.set(name).unwrap_or_default();
        // An entry lost behind the agent's back stays lost until the next full sync
        // (the periodic resync) puts it back.
        let lost = "10.96.0.10,tcp:80";
        assert!(set_entries("KUBE-CLUSTER-IP").contains(lost));
        ipset::Backend::apply(
            &kernel.sets.sets,
            &[ipset::SetOp::Del {
                set: "KUBE-CLUSTER-IP".into(),
                entry: lost.into(),
            }],
        )
        .unwrap();
        slice_mut(&mut st, "s2")
            .endpoints
            .push(endpoint("10.244.2.10", "n2"));
        publisher.publish(Arc::new(st.clone()));
        assert_eq!(
            c.sync(false).unwrap().unwrap().writes,
            3,
            "two servers, one entry"
        );
        assert!(!set_entries("KUBE-CLUSTER-IP").contains(lost));
        let reads = kernel.sets.reads.load(Ordering::SeqCst);
        assert_eq!(c.sync(true).unwrap().unwrap().writes, 1);
        assert!(set_entries("KUBE-CLUSTER-IP").contains(lost));
        assert_eq!(
            kernel.sets.reads.load(Ordering::SeqCst),
            reads + 1,
            "one read of the sets for both families"
        );
    }
}
