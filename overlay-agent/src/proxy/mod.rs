//! The service proxy controller: makes Services reachable without kube-proxy. A source
//! (the Kubernetes API or a directory) publishes snapshots of the model; each run
//! computes the rules of the mode as data from them and lets the firewall layer write
//! only what differs from what the kernel holds. It never imports the overlay.

pub mod conntrack;
pub mod health;
pub mod iptables;
pub mod ipvs;
pub mod model;
pub mod nftables;
pub mod source;
#[cfg(test)]
mod trace;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use calyx_dataplane::firewall::iptables::{self as ipt, IptablesCommand, RulesetSync};
use calyx_dataplane::firewall::nft::{self, NftCommand, TableSync, Touched};
use calyx_dataplane::firewall::{FirewallError, IpFamily};
use clap::ValueEnum;
use ipnetwork::IpNetwork;

use crate::metrics::Metrics;
use crate::runtime::{Controller, Trigger, Triggers};
use model::{PortPlan, ProxyState, ServiceKey};
use nftables::NodeContext;
use source::{Publisher, Snapshot};

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
    pub services_dir: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub nodeport_addresses: Vec<IpNetwork>,
    /// IPVS mode: the scheduler of Services that name none.
    pub ipvs_scheduler: String,
    /// IPVS mode: how long a removed real server may drain its connections.
    pub ipvs_drain: std::time::Duration,
}

/// Where the rules go: the kernel, or fakes in tests.
pub struct Backends {
    pub nft: Box<dyn nft::Backend>,
    pub iptables: Box<dyn ipt::Backend>,
    /// Whether to run `conntrack -D` for stale UDP flows.
    pub conntrack: bool,
    /// IPVS, its sets and kube-ipvs0 (IPVS mode only).
    pub ipvs: Option<ipvs::IpvsBackends>,
}

impl Backends {
    /// The kernel's; IPVS mode fails here when the kernel has no IPVS.
    pub fn kernel(mode: ProxyMode) -> anyhow::Result<Backends> {
        Ok(Backends {
            nft: Box::new(NftCommand),
            iptables: Box::new(IptablesCommand::host()),
            conntrack: true,
            ipvs: match mode {
                ProxyMode::Ipvs => Some(ipvs_kernel()?),
                _ => None,
            },
        })
    }
}

fn ipvs_kernel() -> anyhow::Result<ipvs::IpvsBackends> {
    Ok(ipvs::IpvsBackends {
        ipvs: Box::new(calyx_dataplane::ipvs::IpvsNetlink::open()?),
        ipset: Box::new(calyx_dataplane::firewall::ipset::IpsetCommand),
        addresses: Box::new(ipvs::KernelAddresses),
    })
}

/// What a sync left programmed, and how many kernel writes (transaction steps) it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Programmed {
    pub ports: usize,
    pub endpoints: usize,
    pub writes: usize,
}

pub struct ProxyController {
    mode: ProxyMode,
    node: String,
    ctx: NodeContext,
    snapshot: Snapshot,
    backends: Backends,
    tables: [TableSync; 2],
    rulesets: [RulesetSync; 2],
    /// The plans last written, per family and Service: what conntrack cleanup and the
    /// next change compare against.
    applied: [HashMap<ServiceKey, Vec<PortPlan>>; 2],
    /// nftables mode: the table as wanted, kept across changes.
    assemblers: [Option<nftables::Assembler>; 2],
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
    /// IPVS mode: what it wrote, and the real servers draining.
    ipvs: ipvs::IpvsSync,
    ipvs_scheduler: String,
    /// IPVS mode: the wanted state, kept across changes like `assemblers`.
    ipvs_assemblers: [Option<ipvs::Assembler>; 2],
    /// IPVS mode: the node addresses NodePorts open on, read on full syncs and checks
    /// (not on each change: at 10,000 Services the dump lists kube-ipvs0's 10,000).
    node_ips: Option<Vec<IpAddr>>,
    /// What the kernel held at start, being read while the source lists (at 10,000
    /// Services both take a good part of a second, on different cores).
    prefetch: Option<(Instant, std::thread::JoinHandle<Prefetched>)>,
}

/// A read older than this is not trusted for the first sync (a source that took long
/// to list); the kernel is read again then.
const PREFETCH_FRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// The kernel's rules of this mode, per family, as read at start.
enum Prefetched {
    Nft([Result<Option<nft::Table>, FirewallError>; 2]),
    Iptables([Result<ipt::Ruleset, FirewallError>; 2]),
    Nothing,
}

impl Prefetched {
    fn read(mode: ProxyMode) -> Prefetched {
        match mode {
            ProxyMode::Nftables => Prefetched::Nft(
                IpFamily::BOTH
                    .map(|family| nft::Backend::dump(&NftCommand, family, nftables::TABLE)),
            ),
            ProxyMode::Iptables => Prefetched::Iptables(IpFamily::BOTH.map(|family| {
                ipt::Backend::dump(&IptablesCommand::host(), family, &iptables::ownership())
            })),
            ProxyMode::Off | ProxyMode::Ipvs => Prefetched::Nothing,
        }
    }
}

impl ProxyController {
    /// Removes the other mode's objects, starts the source, and returns the controller.
    pub fn start(
        config: ProxyConfig,
        metrics: Arc<Metrics>,
        triggers: Triggers,
    ) -> anyhow::Result<ProxyController> {
        let backends = Backends::kernel(config.mode)?;
        if config.mode == ProxyMode::Ipvs {
            set_ipvs_sysctls();
        }
        let (publisher, snapshot) = Publisher::new(triggers);
        match &config.services_dir {
            Some(dir) => {
                tracing::info!(dir = %dir.display(), "Services and EndpointSlices from a directory");
                source::dir::spawn(dir.clone(), config.node_name.clone(), publisher);
            }
            None => source::kube::spawn(
                config.kubeconfig.clone(),
                config.node_name.clone(),
                publisher,
            )?,
        }
        let mut controller = ProxyController::new(config, backends, snapshot, metrics);
        tokio::task::block_in_place(|| controller.remove_other_modes());
        let mode = controller.mode;
        controller.prefetch = std::thread::Builder::new()
            .name("proxy-prefetch".into())
            .spawn(move || Prefetched::read(mode))
            .ok()
            .map(|handle| (Instant::now(), handle));
        Ok(controller)
    }

    pub fn new(
        config: ProxyConfig,
        backends: Backends,
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
        let owner = match config.mode {
            ProxyMode::Ipvs => ipvs::ownership(),
            _ => iptables::ownership(),
        };
        ProxyController {
            mode: config.mode,
            node: config.node_name,
            ctx: NodeContext {
                nodeport_addresses: config.nodeport_addresses,
            },
            snapshot,
            backends,
            tables: [TableSync::new(), TableSync::new()],
            rulesets: [RulesetSync::new(owner.clone()), RulesetSync::new(owner)],
            applied: [HashMap::new(), HashMap::new()],
            assemblers: [None, None],
            applied_state: None,
            health: health::HealthServers::default(),
            metrics,
            synced,
            trigger_times: HashMap::new(),
            health_checks: BTreeMap::new(),
            prefetch: None,
            ipvs: ipvs::IpvsSync::new(config.ipvs_drain),
            ipvs_scheduler: config.ipvs_scheduler,
            ipvs_assemblers: [None, None],
            node_ips: None,
        }
    }

    /// Hands what was read at start to the firewall layer: true when the kernel need
    /// not be read again for this run. A failed read is read again.
    fn take_prefetch(&mut self) -> bool {
        let Some((started, handle)) = self.prefetch.take() else {
            return false;
        };
        let Ok(read) = handle.join() else {
            return false;
        };
        if started.elapsed() > PREFETCH_FRESH {
            return false;
        }
        match read {
            Prefetched::Nft(tables) => {
                let [Ok(v4), Ok(v6)] = tables else {
                    return false;
                };
                self.tables[0].start_from(v4);
                self.tables[1].start_from(v6);
            }
            Prefetched::Iptables(rulesets) => {
                let [Ok(v4), Ok(v6)] = rulesets else {
                    return false;
                };
                self.rulesets[0].start_from(v4);
                self.rulesets[1].start_from(v6);
            }
            Prefetched::Nothing => return false,
        }
        true
    }

    /// Switching modes: what the other mode wrote goes at start. (IPVS mode owns the
    /// iptables mode's chains too: its first sync replaces them in one transaction.)
    fn remove_other_modes(&self) {
        if self.mode != ProxyMode::Nftables {
            remove_nft_tables(self.backends.nft.as_ref());
        }
        if self.mode == ProxyMode::Nftables {
            remove_iptables_chains(self.backends.iptables.as_ref());
        }
        if self.mode != ProxyMode::Ipvs {
            remove_ipvs_leftovers(self.backends.iptables.as_ref(), self.mode);
        }
    }

    /// One sync; returns what is programmed, or None before the source has listed
    /// everything once.
    fn sync(&mut self, full: bool) -> anyhow::Result<Option<Programmed>> {
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
        // A full run (start, resync) recomputes every Service and compares the whole
        // table with the kernel; otherwise only the Services whose objects changed.
        // A new zone for this node can change every Service's endpoints (hints).
        let changed = match &self.applied_state {
            Some(before) if !full && before.node_zone == state.node_zone => {
                Some(state.changed_services(before))
            }
            _ => None,
        };
        let t0 = Instant::now();
        // The first run: what the kernel held was read at start.
        let primed = self.take_prefetch();
        let reread = full && !primed;
        // The slices of the Services to recompute (all of them on a full run).
        let mut slices: HashMap<&ServiceKey, Vec<&Arc<model::Slice>>> = HashMap::new();
        let mut new_slices: Vec<(&ServiceKey, &model::Slice)> = Vec::new();
        for (slice_key, slice) in &state.slices {
            if changed.as_ref().is_none_or(|c| c.contains(&slice.service)) {
                slices.entry(&slice.service).or_default().push(slice);
                new_slices.push((slice_key, slice));
            }
        }
        tracing::debug!(changed = ?changed.as_ref().map(|c| c.len()), elapsed = ?t0.elapsed(), "changes found");
        // Health checks first: IPVS mode opens their ports in its sets.
        if changed.is_none() {
            self.health_checks.clear();
        }
        for key in changed.iter().flatten().chain(
            changed
                .is_none()
                .then(|| state.services.keys())
                .into_iter()
                .flatten(),
        ) {
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
        if reread {
            self.ipvs.forget();
        }
        if self.mode == ProxyMode::Ipvs && (changed.is_none() || self.node_ips.is_none()) {
            self.node_ips = Some(self.read_node_ips()?);
        }
        let mut writes = 0;
        for (i, family) in IpFamily::BOTH.into_iter().enumerate() {
            let started = Instant::now();
            let kept = match self.mode {
                ProxyMode::Nftables => self.assemblers[i].is_some(),
                ProxyMode::Ipvs => self.ipvs_assemblers[i].is_some(),
                ProxyMode::Iptables | ProxyMode::Off => true,
            };
            let keys: Vec<ServiceKey> = match &changed {
                Some(keys) if kept => keys.iter().cloned().collect(),
                _ => {
                    let mut all: Vec<ServiceKey> = state.services.keys().cloned().collect();
                    all.extend(self.applied[i].keys().cloned());
                    all.sort();
                    all.dedup();
                    all
                }
            };
            let mut stale = std::collections::BTreeSet::new();
            let mut updates = Vec::with_capacity(keys.len());
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
                let before = self.applied[i].remove(&key).unwrap_or_default();
                stale.extend(conntrack::stale_udp(&before, &plans));
                updates.push((key, plans));
            }
            let planned = started.elapsed();
            match self.mode {
                ProxyMode::Nftables => {
                    let rebuild = changed.is_none() || self.assemblers[i].is_none();
                    // A failed write leaves what the kernel holds unknown: the next
                    // run starts over (every Service, the kernel read again).
                    let start_over = |c: &mut Self| {
                        c.assemblers = [None, None];
                        c.applied_state = None;
                    };
                    if rebuild {
                        self.assemblers[i] = Some(nftables::Assembler::new(family, &self.ctx));
                    }
                    let assembler = self.assemblers[i].as_mut().expect("set above");
                    let mut touched = Touched::default();
                    for (key, plans) in &updates {
                        let fragments = plans
                            .iter()
                            .map(|p| nftables::fragment(p, family))
                            .collect();
                        assembler.replace(key, fragments, &mut touched);
                    }
                    let nft = self.backends.nft.as_ref();
                    let result = if rebuild {
                        self.tables[i].sync(nft, assembler.table(), reread)
                    } else {
                        self.tables[i].sync_touched(nft, assembler.table(), &touched)
                    };
                    let tx = match result {
                        Ok(tx) => tx,
                        Err(e) => {
                            start_over(self);
                            return Err(e.into());
                        }
                    };
                    writes += tx.ops.len();
                    tracing::debug!(%family, services = updates.len(), ?planned, written = ?started.elapsed(), ops = tx.ops.len(), "nftables sync");
                }
                ProxyMode::Iptables => {}
                ProxyMode::Ipvs => {
                    let backends = self
                        .backends
                        .ipvs
                        .as_ref()
                        .expect("IPVS mode has IPVS backends");
                    let rebuild = changed.is_none() || self.ipvs_assemblers[i].is_none();
                    if rebuild {
                        let node_ips: Vec<IpAddr> = self
                            .node_ips
                            .iter()
                            .flatten()
                            .filter(|ip| IpFamily::of(**ip) == family)
                            .copied()
                            .collect();
                        self.ipvs_assemblers[i] = Some(ipvs::Assembler::new(
                            family,
                            &node_ips,
                            &self.ipvs_scheduler,
                        ));
                    }
                    let assembler = self.ipvs_assemblers[i].as_mut().expect("set above");
                    for (key, plans) in &updates {
                        assembler.replace(key, plans);
                    }
                    let health: Vec<u16> =
                        self.health_checks.values().map(|(port, _)| *port).collect();
                    assembler.set_health_check_ports(&health);
                    let touched = assembler.take_touched();
                    let scope = if rebuild {
                        ipvs::Scope::Full { reread }
                    } else {
                        ipvs::Scope::Partial(&touched)
                    };
                    let computed = started.elapsed();
                    let result = self.ipvs.sync(
                        backends,
                        &mut self.rulesets[i],
                        self.backends.iptables.as_ref(),
                        assembler.desired(),
                        scope,
                    );
                    // A failed write leaves what the kernel holds unknown: the next run
                    // starts over (every Service, the kernel read again).
                    let written = result.inspect_err(|_| {
                        self.applied_state = None;
                        self.ipvs_assemblers = [None, None];
                        self.ipvs.forget();
                    })?;
                    writes += written;
                    tracing::debug!(%family, services = updates.len(), full = rebuild, ?computed, written = ?started.elapsed(), writes = written, "ipvs sync");
                }
                ProxyMode::Off => {}
            }
            for (key, plans) in updates {
                if !plans.is_empty() {
                    self.applied[i].insert(key, plans);
                }
            }
            if self.mode == ProxyMode::Iptables {
                let mut all: Vec<&PortPlan> = self.applied[i].values().flatten().collect();
                all.sort_by(|a, b| (&a.service, &a.port_name).cmp(&(&b.service, &b.port_name)));
                let plans: Vec<PortPlan> = all.into_iter().cloned().collect();
                let ruleset = iptables::desired_ruleset(&plans, family, &self.ctx);
                let computed = started.elapsed();
                let tx = self.rulesets[i]
                    .sync(self.backends.iptables.as_ref(), &ruleset, reread)
                    .inspect_err(|_| self.applied_state = None)?;
                let ops = tx.tables.iter().map(|(_, ops)| ops.len()).sum::<usize>();
                writes += ops;
                tracing::debug!(%family, ?computed, written = ?started.elapsed(), ops, "iptables sync");
            }
            if self.backends.conntrack && !stale.is_empty() {
                conntrack::delete(&stale);
            }
        }
        let t1 = Instant::now();
        self.observe_programming_latency(&new_slices, changed.is_none());
        tracing::debug!(elapsed = ?t1.elapsed(), total = ?t0.elapsed(), "health and latency");
        self.applied_state = Some(state);
        Ok(Some(self.programmed(writes)))
    }

    /// The periodic check: whether the kernel lost anything this mode wrote (a table or
    /// chain deleted, a jump removed or pushed below another agent's), read cheaply.
    /// Only a synced proxy checks; a failed look counts as drift.
    fn kernel_drifted(&self) -> bool {
        if self.applied_state.is_none() {
            return false;
        }
        let drifted = IpFamily::BOTH
            .into_iter()
            .enumerate()
            .find_map(|(i, family)| {
                let looked = match self.mode {
                    ProxyMode::Nftables => self.tables[i].drifted(self.backends.nft.as_ref()),
                    ProxyMode::Iptables | ProxyMode::Ipvs => {
                        self.rulesets[i].jumps_drifted(self.backends.iptables.as_ref())
                    }
                    ProxyMode::Off => Ok(false),
                };
                match looked {
                    Ok(false) => None,
                    Ok(true) => Some((family, "rules lost or moved".to_string())),
                    Err(e) => Some((family, format!("could not look: {e}"))),
                }
            });
        if let Some((family, why)) = &drifted {
            tracing::warn!(%family, why, "the kernel no longer holds what the service proxy wrote; syncing everything");
        }
        drifted.is_some()
    }

    /// IPVS mode: the node's addresses NodePorts open on (both families).
    fn read_node_ips(&self) -> anyhow::Result<Vec<IpAddr>> {
        let backends = self
            .backends
            .ipvs
            .as_ref()
            .expect("IPVS mode has IPVS backends");
        backends.addresses.node_ips(&self.ctx.nodeport_addresses)
    }

    /// IPVS mode, on a check: whether the node's addresses changed since they were read
    /// (a full sync then opens NodePorts on the new ones). A failed read counts.
    fn node_ips_changed(&self) -> bool {
        if self.mode != ProxyMode::Ipvs || self.node_ips.is_none() {
            return false;
        }
        match self.read_node_ips() {
            Ok(ips) if Some(&ips) == self.node_ips.as_ref() => false,
            Ok(ips) => {
                tracing::info!(?ips, before = ?self.node_ips, "the node's addresses changed; syncing everything");
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not read the node's addresses; syncing everything"
                );
                true
            }
        }
    }

    /// IPVS mode: removes drained real servers whose connections have ended.
    fn sweep_drained(&mut self) {
        if let Some(backends) = &self.backends.ipvs {
            if let Err(e) = self.ipvs.sweep(backends) {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not check the draining real servers"
                );
                self.ipvs.forget();
            }
        }
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
            let full = full
                || (trigger == Trigger::Check
                    && (self.kernel_drifted() || self.node_ips_changed()));
            if trigger == Trigger::Check {
                self.sweep_drained();
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

fn remove_nft_tables(backend: &dyn nft::Backend) {
    for family in IpFamily::BOTH {
        let result = backend.dump(family, nftables::TABLE).and_then(|current| {
            let tx = nft::plan_removal(current.as_ref(), family, nftables::TABLE);
            if !tx.is_empty() {
                backend.apply(&tx)?;
                tracing::info!(%family, "removed the nftables proxy table");
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(%family, error = %e, "could not remove the nftables proxy table");
        }
    }
}

fn remove_iptables_chains(backend: &dyn ipt::Backend) {
    for family in IpFamily::BOTH {
        let mut sync = RulesetSync::new(iptables::ownership());
        match sync.sync(backend, &ipt::Ruleset::new(family), true) {
            Ok(tx) if !tx.is_empty() => {
                tracing::info!(%family, "removed the iptables proxy chains")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%family, error = %e, "could not remove the iptables proxy chains")
            }
        }
    }
}

/// IPVS mode's objects when another mode runs: only when kube-ipvs0 is there (a host
/// that never ran IPVS mode pays nothing). The iptables mode keeps the chains it shares
/// with IPVS mode (its own sync rewrites them); the IPVS-only ones go.
fn remove_ipvs_leftovers(iptables: &dyn ipt::Backend, mode: ProxyMode) {
    let addresses: Box<dyn ipvs::Addresses> = Box::new(ipvs::KernelAddresses);
    if !matches!(addresses.held(), Ok(Some(_))) {
        return;
    }
    tracing::info!("removing what IPVS mode left (kube-ipvs0 is present)");
    let ipvs = match calyx_dataplane::ipvs::IpvsNetlink::open() {
        Ok(ipvs) => Box::new(ipvs) as Box<dyn calyx_dataplane::ipvs::Backend>,
        Err(e) => {
            tracing::warn!(error = %e, "IPVS virtual services left as they are");
            Box::new(calyx_dataplane::ipvs::RecordingIpvs::new())
        }
    };
    let backends = ipvs::IpvsBackends {
        ipvs,
        ipset: Box::new(calyx_dataplane::firewall::ipset::IpsetCommand),
        addresses,
    };
    ipvs::remove_all(&backends, iptables, mode == ProxyMode::Iptables);
}

/// The sysctls IPVS mode needs (see `ipvs::sysctls`); a failure is logged, not fatal.
fn set_ipvs_sysctls() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    for (key, value) in ipvs::sysctls(release.trim()) {
        let path = format!("/proc/sys/{key}");
        match std::fs::write(&path, value) {
            Ok(()) => tracing::debug!(key, value, "sysctl set"),
            Err(e) => tracing::warn!(key, value, error = %e, "could not set sysctl"),
        }
    }
}

/// At start with --proxy-mode off: remove the nftables table a previous run left. The
/// iptables chains carry kube-proxy's names and may be kube-proxy's own: left alone.
pub fn cleanup_stale() {
    remove_nft_tables(&NftCommand);
}

/// `--proxy-cleanup`: everything any mode created, as `kube-proxy --cleanup` does.
pub fn cleanup_all() -> anyhow::Result<()> {
    remove_nft_tables(&NftCommand);
    remove_iptables_chains(&IptablesCommand::host());
    remove_ipvs_leftovers(&IptablesCommand::host(), ProxyMode::Off);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::tests::{endpoint, key, service, slice, slice_mut, state};
    use crate::runtime::Triggers;
    use calyx_dataplane::firewall::iptables::RecordingIptables;
    use calyx_dataplane::firewall::nft::RecordingNft;

    /// A controller on fakes, and the way to hand it snapshots.
    fn controller(mode: ProxyMode) -> (ProxyController, Publisher, Arc<RecordingNft>) {
        let (triggers, _rx) = Triggers::channel();
        let (publisher, snapshot) = Publisher::new(triggers);
        let nft = Arc::new(RecordingNft::new());
        struct Shared(Arc<RecordingNft>);
        impl nft::Backend for Shared {
            fn dump(
                &self,
                f: IpFamily,
                t: &str,
            ) -> Result<Option<nft::Table>, calyx_dataplane::firewall::FirewallError> {
                self.0.dump(f, t)
            }
            fn apply(
                &self,
                tx: &nft::Transaction,
            ) -> Result<(), calyx_dataplane::firewall::FirewallError> {
                self.0.apply(tx)
            }
        }
        let backends = Backends {
            nft: Box::new(Shared(nft.clone())),
            iptables: Box::new(RecordingIptables::new()),
            conntrack: false,
            ipvs: None,
        };
        let config = ProxyConfig {
            mode,
            node_name: "n1".into(),
            services_dir: None,
            kubeconfig: None,
            nodeport_addresses: vec!["192.0.2.11/32".parse().unwrap()],
            ipvs_scheduler: "rr".into(),
            ipvs_drain: std::time::Duration::from_secs(60),
        };
        let metrics = Metrics::new(std::time::Duration::from_secs(10));
        (
            ProxyController::new(config, backends, snapshot, metrics),
            publisher,
            nft,
        )
    }

    /// A change to the cluster, one step of a test.
    type Step = Box<dyn Fn(&mut ProxyState)>;

    /// Applies `step`, hands the controller the new snapshot and syncs the change.
    fn sync_step(
        c: &mut ProxyController,
        publisher: &Publisher,
        st: &mut ProxyState,
        step: &Step,
        n: usize,
    ) {
        step(st);
        publisher.publish(Arc::new(st.clone()));
        let written = c.sync(false).unwrap().unwrap();
        assert!(written.writes > 0, "step {n} wrote nothing");
    }

    #[test]
    fn the_periodic_check_sees_a_table_deleted_by_hand() {
        let (mut c, publisher, kernel) = controller(ProxyMode::Nftables);
        assert!(
            !c.kernel_drifted(),
            "nothing to check before the first sync"
        );
        let st = state(
            vec![service("web", "10.96.0.10", 80)],
            vec![slice("web", 8080, vec![endpoint("10.244.1.2", "n1")])],
        );
        publisher.publish(Arc::new(st));
        c.sync(true).unwrap().unwrap();
        assert!(!c.kernel_drifted());
        nft::Backend::apply(
            kernel.as_ref(),
            &nft::Transaction {
                family: IpFamily::V4,
                table: nftables::TABLE.into(),
                ops: vec![nft::Op::DeleteTable],
            },
        )
        .unwrap();
        assert!(c.kernel_drifted());
        assert!(c.sync(true).unwrap().unwrap().writes > 0);
        assert!(!c.kernel_drifted());
    }

    #[test]
    fn changes_applied_one_service_at_a_time_leave_the_kernel_as_a_full_sync_would() {
        let (mut c, publisher, kernel) = controller(ProxyMode::Nftables);
        let mut st = state(
            (0..20)
                .map(|i| service(&format!("s{i}"), &format!("10.96.0.{}", i + 1), 80))
                .collect(),
            (0..20)
                .map(|i| {
                    slice(
                        &format!("s{i}"),
                        8080,
                        vec![endpoint(&format!("10.244.1.{}", i + 1), "n1")],
                    )
                })
                .collect(),
        );
        publisher.publish(Arc::new(st.clone()));
        assert!(c.sync(true).unwrap().unwrap().writes > 0);
        // Endpoint counts change (maps and chains come and go), Services come and go.
        let steps: Vec<Step> = vec![
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
        ];
        for (n, step) in steps.iter().enumerate() {
            sync_step(&mut c, &publisher, &mut st, step, n);
            let plans = model::port_plans(&st, "n1", IpFamily::V4);
            let whole = nftables::desired_table(&plans, IpFamily::V4, &c.ctx);
            let mut held = kernel.table(IpFamily::V4, nftables::TABLE).unwrap();
            // The fake keeps what was written; compare like with like.
            for (name, set) in &mut held.sets {
                assert_eq!(
                    set.elements, whole.sets[name].elements,
                    "step {n}: set {name}"
                );
            }
            assert_eq!(
                held.sets.keys().collect::<Vec<_>>(),
                whole.sets.keys().collect::<Vec<_>>(),
                "step {n}: sets"
            );
            assert_eq!(held.chains, whole.chains, "step {n}: chains");
        }
        // Nothing changed: nothing written.
        publisher.publish(Arc::new(st.clone()));
        assert_eq!(c.sync(false).unwrap().unwrap().writes, 0);
    }

    #[test]
    fn ipvs_changes_applied_one_service_at_a_time_leave_the_kernel_as_a_full_sync_would() {
        use calyx_dataplane::firewall::ipset::{self, RecordingIpset};
        use calyx_dataplane::ipvs::{self as ipvs_dp, RecordingIpvs};
        struct SharedIpvs(Arc<RecordingIpvs>);
        impl ipvs_dp::Backend for SharedIpvs {
            fn dump(&self) -> ipvs_dp::Result<ipvs_dp::Services> {
                self.0.dump()
            }
            fn apply(&self, ops: &[ipvs_dp::Op]) -> ipvs_dp::Result<()> {
                self.0.apply(ops)
            }
        }
        static SET_READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        struct SharedIpset(Arc<RecordingIpset>);
        impl ipset::Backend for SharedIpset {
            fn dump(&self, owns: ipset::Owns) -> Result<ipset::HeldSets, FirewallError> {
                SET_READS.fetch_add(1, Ordering::SeqCst);
                self.0.dump(owns)
            }
            fn restore(&self, script: &str) -> Result<(), FirewallError> {
                self.0.restore(script)
            }
        }
        let (mut c, publisher, _) = controller(ProxyMode::Ipvs);
        let kernel_ipvs = Arc::new(RecordingIpvs::new());
        let kernel_sets = Arc::new(RecordingIpset::new());
        let kernel_addresses = Arc::new(ipvs::tests::FakeAddresses::default());
        c.backends.ipvs = Some(ipvs::IpvsBackends {
            ipvs: Box::new(SharedIpvs(kernel_ipvs.clone())),
            ipset: Box::new(SharedIpset(kernel_sets.clone())),
            addresses: Box::new(kernel_addresses.clone()),
        });
        c.rulesets = [
            RulesetSync::new(ipvs::ownership()),
            RulesetSync::new(ipvs::ownership()),
        ];
        // s0 and s1 share an endpoint (one KUBE-LOOP-BACK entry for both); even ones
        // have a NodePort.
        let mut st = state(
            (0..10)
                .map(|i| {
                    let mut s = service(&format!("s{i}"), &format!("10.96.0.{}", i + 1), 80);
                    if i % 2 == 0 {
                        s.ports[0].node_port = Some(30000 + i);
                    }
                    s
                })
                .collect(),
            (0..10)
                .map(|i| {
                    let ep = format!("10.244.1.{}", i.max(1));
                    slice(&format!("s{i}"), 8080, vec![endpoint(&ep, "n1")])
                })
                .collect(),
        );
        publisher.publish(Arc::new(st.clone()));
        // The first run (a Source trigger, not a re-read) reads the sets once too.
        assert!(c.sync(false).unwrap().unwrap().writes > 0);
        assert_eq!(
            SET_READS.load(Ordering::SeqCst),
            1,
            "one read at the first sync"
        );
        let steps: Vec<Step> = vec![
            // An endpoint added, another taken (drained: weight 0, kept).
            Box::new(|st| {
                slice_mut(st, "s2")
                    .endpoints
                    .push(endpoint("10.244.2.9", "n2"))
            }),
            Box::new(|st| slice_mut(st, "s2").endpoints.truncate(1)),
            // The shared endpoint leaves one of its two Services: its entry stays.
            Box::new(|st| slice_mut(st, "s0").endpoints.clear()),
            // A Service goes (its address and NodePort with it), another comes on a
            // new address with affinity.
            Box::new(|st| {
                st.services.remove(&key("s4"));
            }),
            Box::new(|st| {
                let mut s = service("s4", "10.96.0.99", 81);
                s.affinity_seconds = Some(30);
                st.services.insert(key("s4"), Arc::new(s));
            }),
            // The other user of the shared endpoint goes: now its entry goes too.
            Box::new(|st| {
                st.slices.remove(&key("s1"));
            }),
        ];
        let set_entries = |name: &str| kernel_sets.set(name).unwrap_or_default();
        for (n, step) in steps.iter().enumerate() {
            sync_step(&mut c, &publisher, &mut st, step, n);
            let plans = model::port_plans(&st, "n1", IpFamily::V4);
            let node_ips = ["192.0.2.11".parse().unwrap()];
            let whole = ipvs::desired(
                &plans,
                IpFamily::V4,
                &ipvs::Node {
                    nodeport_ips: &node_ips,
                    health_check_ports: &[],
                    default_scheduler: "rr",
                },
            );
            // Drained servers (weight 0) are the kernel's until their connections end.
            let mut held = kernel_ipvs.services();
            for service in held.values_mut() {
                service.servers.retain(|_, s| s.weight > 0);
            }
            assert_eq!(held, whole.services, "step {n}: virtual services");
            for set in &whole.sets {
                assert_eq!(
                    set_entries(&set.name),
                    set.entries,
                    "step {n}: {}",
                    set.name
                );
            }
            let addresses = kernel_addresses.0.lock().unwrap().clone().unwrap();
            assert_eq!(addresses, whole.addresses, "step {n}: kube-ipvs0");
        }
        // Nothing changed: nothing written; a full sync finds nothing to write either.
        publisher.publish(Arc::new(st.clone()));
        assert_eq!(c.sync(false).unwrap().unwrap().writes, 0);
        assert_eq!(c.sync(true).unwrap().unwrap().writes, 0);
        // A change looks only at what it touched: an entry lost behind the agent's back
        // stays lost until the next full sync (the periodic resync) puts it back.
        let lost = "10.96.0.10,tcp:80";
        assert!(set_entries("KUBE-CLUSTER-IP").contains(lost));
        ipset::Backend::restore(
            kernel_sets.as_ref(),
            &format!("del KUBE-CLUSTER-IP {lost}\n"),
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
        let reads = SET_READS.load(Ordering::SeqCst);
        assert_eq!(c.sync(true).unwrap().unwrap().writes, 1);
        assert!(set_entries("KUBE-CLUSTER-IP").contains(lost));
        assert_eq!(
            SET_READS.load(Ordering::SeqCst),
            reads + 1,
            "one read of the sets for both families"
        );
    }
}
