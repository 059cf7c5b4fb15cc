//! The service proxy controller: makes Services reachable without kube-proxy. A source
//! (the Kubernetes API or a directory) publishes snapshots of the model; each run
//! computes the rules of the mode as data from them and lets the firewall layer write
//! only what differs from what the kernel holds. It never imports the overlay.

pub mod conntrack;
pub mod health;
pub mod iptables;
pub mod model;
pub mod nftables;
pub mod source;
#[cfg(test)]
mod trace;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use calyx_dataplane::firewall::iptables::{self as ipt, IptablesCommand, RulesetSync};
use calyx_dataplane::firewall::nft::{self, NftCommand, TableSync};
use calyx_dataplane::firewall::IpFamily;
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
}

pub struct ProxyConfig {
    pub mode: ProxyMode,
    pub node_name: String,
    pub services_dir: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub nodeport_addresses: Vec<IpNetwork>,
}

/// Where the rules go: the kernel, or fakes in tests.
pub struct Backends {
    pub nft: Box<dyn nft::Backend>,
    pub iptables: Box<dyn ipt::Backend>,
    /// Whether to run `conntrack -D` for stale UDP flows.
    pub conntrack: bool,
}

impl Backends {
    pub fn kernel() -> Backends {
        Backends {
            nft: Box::new(NftCommand),
            iptables: Box::new(IptablesCommand),
            conntrack: true,
        }
    }
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
    /// The plans last written, per family: what conntrack cleanup compares against.
    applied: [Vec<PortPlan>; 2],
    applied_state: Option<Arc<ProxyState>>,
    health: health::HealthServers,
    metrics: Arc<Metrics>,
    synced: Arc<AtomicBool>,
    /// Trigger times already measured, per slice.
    trigger_times: BTreeMap<ServiceKey, f64>,
}

impl ProxyController {
    /// Removes the other mode's objects, starts the source, and returns the controller.
    pub fn start(
        config: ProxyConfig,
        metrics: Arc<Metrics>,
        triggers: Triggers,
    ) -> anyhow::Result<ProxyController> {
        let (publisher, snapshot) = Publisher::new(triggers);
        match &config.services_dir {
            Some(dir) => {
                tracing::info!(dir = %dir.display(), "Services and EndpointSlices from a directory");
                source::dir::spawn(dir.clone(), publisher);
            }
            None => source::kube::spawn(config.kubeconfig.clone(), publisher)?,
        }
        let controller = ProxyController::new(config, Backends::kernel(), snapshot, metrics);
        tokio::task::block_in_place(|| controller.remove_other_modes());
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
        ProxyController {
            mode: config.mode,
            node: config.node_name,
            ctx: NodeContext {
                nodeport_addresses: config.nodeport_addresses,
            },
            snapshot,
            backends,
            tables: [TableSync::new(), TableSync::new()],
            rulesets: [
                RulesetSync::new(iptables::ownership()),
                RulesetSync::new(iptables::ownership()),
            ],
            applied: [Vec::new(), Vec::new()],
            applied_state: None,
            health: health::HealthServers::default(),
            metrics,
            synced,
            trigger_times: BTreeMap::new(),
        }
    }

    /// Switching modes: what the other mode wrote goes at start.
    fn remove_other_modes(&self) {
        if self.mode != ProxyMode::Nftables {
            remove_nft_tables(self.backends.nft.as_ref());
        }
        if self.mode != ProxyMode::Iptables {
            remove_iptables_chains(self.backends.iptables.as_ref());
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
        let mut writes = 0;
        for (i, family) in IpFamily::BOTH.into_iter().enumerate() {
            let plans = model::port_plans(&state, &self.node, family);
            match self.mode {
                ProxyMode::Nftables => {
                    let table = nftables::desired_table(&plans, family, &self.ctx);
                    let tx = self.tables[i].sync(self.backends.nft.as_ref(), &table, full)?;
                    writes += tx.ops.len();
                }
                ProxyMode::Iptables => {
                    let ruleset = iptables::desired_ruleset(&plans, family, &self.ctx);
                    let tx =
                        self.rulesets[i].sync(self.backends.iptables.as_ref(), &ruleset, full)?;
                    if !tx.is_empty() {
                        tracing::debug!(%family, "iptables written");
                    }
                }
                ProxyMode::Off => {}
            }
            let stale = conntrack::stale_udp(&self.applied[i], &plans);
            if self.backends.conntrack && !stale.is_empty() {
                conntrack::delete(&stale);
            }
            self.applied[i] = plans;
        }
        self.health
            .update(&model::health_checks(&state, &self.node));
        self.observe_programming_latency(&state);
        self.applied_state = Some(state);
        Ok(Some(self.programmed(writes)))
    }

    fn programmed(&self, writes: usize) -> Programmed {
        Programmed {
            ports: self.applied.iter().map(Vec::len).sum(),
            endpoints: self
                .applied
                .iter()
                .flatten()
                .map(|p| p.all_endpoints().count())
                .sum(),
            writes,
        }
    }

    /// Network-programming latency: from each slice's new trigger time to now.
    fn observe_programming_latency(&mut self, state: &ProxyState) {
        let now = calyx_ipam::unix_now() as f64;
        let now = now.max(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(now),
        );
        let first = self.applied_state.is_none();
        let mut seen = BTreeMap::new();
        for (key, slice) in &state.slices {
            let Some(t) = slice.trigger_time else {
                continue;
            };
            // The first sync after a start measures nothing: those changes are old.
            if !first && self.trigger_times.get(key) != Some(&t) && now >= t {
                self.metrics
                    .proxy
                    .network_programming_seconds
                    .observe(now - t);
            }
            seen.insert(key.clone(), t);
        }
        self.trigger_times = seen;
    }
}

impl Controller for ProxyController {
    fn name(&self) -> &'static str {
        "proxy"
    }

    async fn reconcile(&mut self, trigger: Trigger, full: bool) -> bool {
        let started = Instant::now();
        let outcome = tokio::task::block_in_place(|| self.sync(full));
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
                m.last_sync_timestamp.set(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or_default(),
                );
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

/// At start with --proxy-mode off: remove the nftables table a previous run left. The
/// iptables chains carry kube-proxy's names and may be kube-proxy's own: left alone.
pub fn cleanup_stale(_: Option<ProxyMode>) {
    remove_nft_tables(&NftCommand);
}

/// `--proxy-cleanup`: everything either mode created, as `kube-proxy --cleanup` does.
pub fn cleanup_all() -> anyhow::Result<()> {
    remove_nft_tables(&NftCommand);
    remove_iptables_chains(&IptablesCommand);
    Ok(())
}
