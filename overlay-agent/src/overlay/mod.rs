//! The overlay controller: registers the node, keeps `vxlan.calyx` and the FDB,
//! neighbour and route entries that reach every other node's blocks, and the pool
//! FORWARD-accept and masquerade rules. It reconciles at once on datastore changes that
//! alter the overlay (seen through its watch-fed cache) and on kernel events, and on
//! the periodic full resync; restarting it changes nothing that is already right.

pub mod cache;
pub mod desired;
pub mod error;
pub mod kernel;
pub mod liveness;
pub mod node_condition;
pub mod pool_rules;
pub mod registration;

use error::{OverlayError, Result};

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use calyx_dataplane::firewall::iptables::{IptablesCommand, RulesetSync};
use calyx_dataplane::firewall::IpFamily;
use calyx_dataplane::overlay::{monitor, KernelEvent, VxlanSpec};
use calyx_dataplane::{sysctl, Netlink, CALYX_ROUTE_PROTOCOL};
use calyx_ipam::model::{NodeRecord, Pool};
use calyx_ipam::store::Store;
use calyx_ipam::Ipam;
use ipnetwork::IpNetwork;

use crate::metrics::Metrics;
use crate::runtime::{Controller, Trigger, Triggers};
use cache::ClusterCache;
use kernel::DeviceConfig;
use liveness::Liveness;
use registration::Underlay;

/// What the overlay needs from the agent's flags.
pub struct OverlayConfig {
    pub node_name: String,
    pub vxlan_device: String,
    pub vxlan_vni: u32,
    pub vxlan_port: u16,
    pub mtu: Option<u32>,
    pub pools: Vec<IpNetwork>,
    pub block_size: Option<u8>,
    pub block_size_v6: Option<u8>,
    pub state_dir: PathBuf,
    pub heartbeat: Duration,
    pub node_timeout: Duration,
    pub firewall: bool,
    /// Kubernetes API credentials for the Node's condition (None: in-cluster config).
    pub kubeconfig: Option<PathBuf>,
}

pub struct OverlayController {
    ipam: Ipam<'static>,
    nl: Netlink,
    node: String,
    device: DeviceConfig,
    liveness: Liveness,
    metrics: Arc<Metrics>,
    firewall: bool,
    pool_rules: [RulesetSync; 2],
    device_index: Arc<AtomicU32>,
    cluster: Arc<ClusterCache>,
    /// A full run was asked for before the cluster had been read: do it then.
    full_pending: bool,
}

impl OverlayController {
    /// Registers the node (retrying while the datastore is away), writes the plugin's
    /// state files, and starts the watchers that trigger runs; the blocks' pods go to
    /// `pod_addresses` when given (the policy controller's).
    pub async fn start(
        config: OverlayConfig,
        store: &'static dyn Store,
        nl: Netlink,
        underlay: &Underlay,
        metrics: Arc<Metrics>,
        triggers: Triggers,
        pod_addresses: Option<crate::source::Publisher<crate::source::PodAddresses>>,
    ) -> Result<OverlayController> {
        let ipam = Ipam::new(store);
        let mtu = config
            .mtu
            .unwrap_or(underlay.link.mtu - registration::vxlan_overhead(underlay.ip));
        tracing::info!(node = %config.node_name, underlay = %underlay.ip, interface = %underlay.link.name, mtu, "starting");
        let pools = calyx_ipam::model::pools_from_cidrs(
            &config.pools,
            config.block_size,
            config.block_size_v6,
        )
        .map_err(|e| OverlayError::Config(format!("--pool {e}")))?;
        metrics.starting("waiting for the datastore (schema)");
        // A store written by a newer Calyx is refused here, before anything is written.
        registration::retry_while_waiting("check the datastore schema", || async {
            Ok(calyx_ipam::schema::ensure_current(ipam.store()).await?)
        })
        .await?;
        metrics.starting("waiting for the datastore (pools)");
        registration::retry_while_waiting("create the --pool pools", || ipam.ensure_pools(&pools))
            .await?;
        metrics.starting("waiting for the datastore (tunnel addresses)");
        let vtep_ips = registration::tunnel_addresses(&ipam, &config.node_name).await?;
        let mac = registration::vtep_mac(&config.node_name);
        let record = registration::register(
            &ipam,
            NodeRecord {
                name: config.node_name.clone(),
                underlay_ip: underlay.ip,
                vtep_ipv4: vtep_ips.iter().copied().find(IpAddr::is_ipv4),
                vtep_ipv6: vtep_ips.iter().copied().find(IpAddr::is_ipv6),
                vtep_mac: calyx_dataplane::format_mac(&mac),
                heartbeat: 0,
            },
        )
        .await?;
        tracing::info!(node = %registration::describe(&record), "registered");
        // Only now may the plugin claim blocks for this node (with requireAgent, ADD
        // waits for these files): the cluster knows the node and its MTU is settled.
        registration::write_state_files(&config.state_dir, &config.node_name, mtu)?;
        node_condition::spawn(config.kubeconfig.clone(), config.node_name.clone());

        sysctl::set("net.ipv4.ip_forward", "1")?;
        if vtep_ips.iter().any(IpAddr::is_ipv6) {
            sysctl::set("net.ipv6.conf.all.forwarding", "1")?;
        }
        metrics.starting("first reconcile has not completed");

        let device_index = Arc::new(AtomicU32::new(0));
        let cluster = {
            let triggers = triggers.clone();
            ClusterCache::spawn(
                store,
                Arc::new(move || {
                    triggers.fire(Trigger::Source);
                }),
                pod_addresses,
            )
        };
        spawn_kernel_events(triggers, device_index.clone())?;
        let heartbeat_problem = Arc::new(Mutex::new(None::<String>));
        spawn_heartbeat(
            store,
            config.node_name.clone(),
            config.heartbeat,
            record,
            heartbeat_problem.clone(),
        );
        {
            let cluster = cluster.clone();
            metrics.add_readiness_check(move || {
                let heartbeat = heartbeat_problem
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                match (cluster.datastore_problem(), heartbeat) {
                    (None, None) => None,
                    (Some(a), Some(b)) => Some(format!("{a}; heartbeat: {b}")),
                    (Some(a), None) => Some(a),
                    (None, Some(b)) => Some(format!("heartbeat: {b}")),
                }
            });
        }
        Ok(OverlayController {
            ipam,
            nl,
            node: config.node_name.clone(),
            device: DeviceConfig {
                spec: VxlanSpec {
                    name: config.vxlan_device,
                    vni: config.vxlan_vni,
                    port: config.vxlan_port,
                    local: underlay.ip,
                    underlay_index: underlay.link.index,
                    mac,
                    mtu,
                },
                vtep_ips,
            },
            liveness: Liveness::new(&config.node_name, config.node_timeout),
            metrics,
            firewall: config.firewall,
            pool_rules: [
                RulesetSync::new(pool_rules::ownership()),
                RulesetSync::new(pool_rules::ownership()),
            ],
            device_index,
            cluster,
            full_pending: false,
        })
    }

    async fn reconcile_once(&mut self, full: bool) -> Result<usize> {
        let t = Instant::now();
        let phase = |name: &str| {
            tracing::debug!(phase = name, elapsed_ms = t.elapsed().as_secs_f64() * 1e3)
        };
        let Some((nodes, blocks)) = self.cluster.snapshot() else {
            // The first listing wakes us again when it is in.
            self.full_pending |= full;
            tracing::debug!("cluster not read yet");
            return Ok(0);
        };
        let full = full || std::mem::take(&mut self.full_pending);
        phase("cluster snapshot");
        let now = Instant::now();
        self.liveness.observe(&nodes, now);
        let (device, device_changed) = kernel::ensure_device(&self.nl, &self.device).await?;
        self.device_index.store(device.index, Ordering::Relaxed);
        phase("device ensured");
        let me = self.node.clone();
        let liveness = &self.liveness;
        let desired = desired::desired_overlay(&me, &nodes, &|n| liveness.is_live(n, now), &blocks);
        let actual = kernel::actual_overlay(&self.nl, &device).await?;
        phase("kernel state read");
        let changes = desired::diff(&desired, &actual);
        tracing::debug!(
            desired_fdb = desired.fdb.len(),
            actual_fdb = actual.fdb.len(),
            desired_neighbours = desired.neighbours.len(),
            actual_neighbours = actual.neighbours.len(),
            desired_routes = desired.routes.len(),
            actual_routes = actual.routes.len(),
            desired_blackholes = desired.blackholes.len(),
            actual_blackholes = actual.blackholes.len(),
            "overlay state"
        );
        let errors = kernel::apply(&device, &changes);
        phase("changes applied");

        self.metrics.nodes_known.set(nodes.len() as i64);
        self.metrics.nodes_live.set(
            nodes
                .iter()
                .filter(|n| self.liveness.is_live(&n.name, now))
                .count() as i64,
        );
        self.metrics.routes.set(desired.routes.len() as i64);
        self.metrics.fdb_entries.set(desired.fdb.len() as i64);
        self.metrics.neighbours.set(desired.neighbours.len() as i64);
        self.metrics.kernel_changes.inc_by(changes.count() as u64);

        // Releasing reads every block from the store: only when the cache shows an
        // empty one it could concern (a node's first block keeps its tunnel address).
        let empty_block = blocks.iter().any(|b| {
            b.empty && (b.affinity.is_none() || b.affinity.as_deref() == Some(me.as_str()))
        });
        if full && empty_block {
            self.release_empty_blocks().await;
        }
        let mut rule_changes = 0;
        if self.firewall && (full || device_changed) {
            rule_changes = self.ensure_pool_rules(full).await?;
        }
        if !errors.is_empty() {
            return Err(OverlayError::Kernel(format!(
                "{} of {} overlay changes failed: {}",
                errors.len(),
                changes.count(),
                errors.join("; ")
            )));
        }
        Ok(changes.count() + usize::from(device_changed) + rule_changes)
    }

    /// Gives this node's long-empty blocks back to the pools (it keeps one). A failure
    /// only delays that to the next resync.
    async fn release_empty_blocks(&self) {
        match self.ipam.release_empty_blocks(&self.node).await {
            Ok(released) if !released.is_empty() => {
                tracing::info!(blocks = ?released, "released empty blocks to the pools")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not release empty blocks"),
        }
    }

    /// The pool rules of each family that has pools; a full run re-reads the kernel
    /// and repairs what someone changed.
    async fn ensure_pool_rules(&mut self, reread: bool) -> Result<usize> {
        let pools: Vec<Pool> = self.ipam.pools().await?;
        let mut changed = 0;
        for (i, family) in IpFamily::BOTH.into_iter().enumerate() {
            if !pools.iter().any(|p| IpFamily::of(p.cidr.ip()) == family) {
                continue;
            }
            let desired = pool_rules::desired_ruleset(&pools, family);
            let sync = &mut self.pool_rules[i];
            let tx = tokio::task::block_in_place(|| {
                sync.sync(&IptablesCommand::host(), &desired, reread)
            })?;
            if !tx.is_empty() {
                tracing::info!(%family, rules = desired.rule_count(), "pool rules written");
                self.metrics.firewall_repairs.inc();
                changed += 1;
            }
        }
        Ok(changed)
    }
}

impl Controller for OverlayController {
    fn name(&self) -> &'static str {
        "overlay"
    }

    async fn reconcile(&mut self, trigger: Trigger, full: bool) -> bool {
        let started = Instant::now();
        self.metrics.attempted();
        self.metrics.reconciles.inc();
        let outcome = self.reconcile_once(full).await;
        let elapsed = started.elapsed();
        self.metrics
            .reconcile_seconds
            .observe(elapsed.as_secs_f64());
        let elapsed_ms = elapsed.as_secs_f64() * 1e3;
        match outcome {
            Ok(changes) => {
                self.metrics.succeeded();
                if changes > 0 || trigger == Trigger::Startup {
                    tracing::info!(?trigger, changes, elapsed_ms, "reconciled");
                } else {
                    tracing::debug!(?trigger, elapsed_ms, "reconciled, nothing to do");
                }
                true
            }
            Err(e) => {
                self.metrics.reconcile_errors.inc();
                tracing::error!(
                    ?trigger,
                    error = format!("{e:#}"),
                    "reconcile failed; will retry after a backoff"
                );
                false
            }
        }
    }
}

/// Someone deleting our device, a neighbour or FDB entry on it, or one of our routes
/// triggers a run at once.
fn spawn_kernel_events(triggers: Triggers, device_index: Arc<AtomicU32>) -> Result<()> {
    let mut events = monitor()?;
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let ours = device_index.load(Ordering::Relaxed);
            let relevant = match event {
                KernelEvent::Link { index, deleted } => deleted && index == ours,
                KernelEvent::Neighbour { index, deleted } => deleted && index == ours,
                KernelEvent::Route {
                    deleted, protocol, ..
                } => deleted && protocol == CALYX_ROUTE_PROTOCOL,
            };
            if relevant && !triggers.fire(Trigger::Kernel) {
                return;
            }
        }
    });
    Ok(())
}

/// Bumps the node record every `interval`, registers the node again when its record
/// vanished, and says in `problem` (for /readyz) when it cannot.
fn spawn_heartbeat(
    store: &'static dyn Store,
    node: String,
    interval: Duration,
    registered: NodeRecord,
    problem: Arc<Mutex<Option<String>>>,
) {
    tokio::spawn(async move {
        let ipam = Ipam::new(store);
        let mut tick = tokio::time::interval(interval);
        let set_problem = |why: Option<String>| {
            *problem.lock().unwrap_or_else(|e| e.into_inner()) = why;
        };
        loop {
            tick.tick().await;
            // One read and one compare-and-swap write per beat; a frozen datastore
            // answers nothing, so a deadline turns that into a problem.
            let beat = tokio::time::timeout(interval * 2, async {
                match ipam.heartbeat(&node).await? {
                    Some(record) => Ok(record),
                    None => {
                        tracing::error!(
                            node,
                            "NODE RECORD VANISHED from the datastore; registering again"
                        );
                        ipam.register_node(registered.clone()).await
                    }
                }
            })
            .await;
            match beat {
                Ok(Ok(_)) => set_problem(None),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "heartbeat failed (datastore unavailable or the record unreadable)");
                    set_problem(Some(e.to_string()));
                }
                Err(_) => {
                    tracing::warn!("heartbeat: the datastore did not answer in time");
                    set_problem(Some("the datastore did not answer in time".into()));
                }
            }
        }
    });
}
