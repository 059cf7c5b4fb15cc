//! calyx-agent: one per node. Registers the node, keeps `vxlan.calyx` and the FDB,
//! neighbour and route entries that reach every other node's blocks, and the
//! FORWARD-accept and masquerade rules. Reconciles at once on datastore changes that
//! alter the overlay (seen through its watch-fed cache, `cache.rs`) and on kernel
//! events, and on a periodic full resync; restarting it changes nothing that is
//! already right, so pod traffic carries on through a restart.

mod cache;
mod desired;
mod kernel;
mod liveness;
mod metrics;
mod registration;
mod rules;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use calyx_dataplane::overlay::{monitor, KernelEvent, VxlanSpec};
use calyx_dataplane::{sysctl, Netlink, CALYX_ROUTE_PROTOCOL};
use calyx_ipam::model::{NodeRecord, Pool};
use calyx_ipam::store::{self, Store};
use calyx_ipam::Ipam;
use clap::{Parser, ValueEnum};
use ipnetwork::IpNetwork;
use tokio::sync::mpsc;

use crate::cache::ClusterCache;
use crate::kernel::DeviceConfig;
use crate::liveness::Liveness;
use crate::metrics::Metrics;

/// Every flag can also come from its environment variable or, below both, from the
/// JSON config file (`--config`, keys in camelCase: {"nodeName": ..., "datastore": ...}).
#[derive(Parser, Debug)]
#[command(name = "calyx-agent", about = "Calyx per-node overlay agent")]
struct Args {
    #[arg(long, env = "CALYX_NODE_NAME")]
    node_name: String,
    #[arg(
        long,
        env = "CALYX_DATASTORE",
        default_value = "file:///var/lib/calyx/store"
    )]
    datastore: String,
    #[arg(long, env = "CALYX_UNDERLAY_INTERFACE", conflicts_with = "underlay_ip")]
    underlay_interface: Option<String>,
    #[arg(long, env = "CALYX_UNDERLAY_IP")]
    underlay_ip: Option<IpAddr>,
    #[arg(long, env = "CALYX_VXLAN_DEVICE", default_value = "vxlan.calyx", value_parser = parse_ifname)]
    vxlan_device: String,
    /// VXLAN network identifier: 24 bits.
    #[arg(long, env = "CALYX_VXLAN_VNI", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=16_777_215))]
    vxlan_vni: u32,
    #[arg(long, env = "CALYX_VXLAN_PORT", default_value_t = 4789,
          value_parser = clap::value_parser!(u16).range(1..))]
    vxlan_port: u16,
    /// MTU of the VXLAN device and of pods; default: underlay MTU - 50 (IPv4) / - 70 (IPv6).
    #[arg(long, env = "CALYX_MTU", value_parser = clap::value_parser!(u32).range(576..=65535))]
    mtu: Option<u32>,
    /// Pools to create when the datastore has none (comma-separated CIDRs).
    #[arg(long = "pool", env = "CALYX_POOLS", value_delimiter = ',')]
    pools: Vec<IpNetwork>,
    /// Block prefix length of the IPv4 pools it creates (default /26).
    #[arg(long, env = "CALYX_BLOCK_SIZE")]
    block_size: Option<u8>,
    /// Block prefix length of the IPv6 pools it creates (default /122).
    #[arg(long, env = "CALYX_BLOCK_SIZE_V6")]
    block_size_v6: Option<u8>,
    #[arg(long, env = "CALYX_METRICS_ADDR", default_value = "127.0.0.1:9099")]
    metrics_addr: SocketAddr,
    /// Where the plugin finds `nodename` and `mtu`.
    #[arg(long, env = "CALYX_STATE_DIR", default_value = "/var/lib/calyx")]
    state_dir: PathBuf,
    #[arg(long, env = "CALYX_RESYNC_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    resync_seconds: u64,
    #[arg(long, env = "CALYX_HEARTBEAT_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_seconds: u64,
    /// A node whose heartbeat does not move for this long is treated as departed.
    #[arg(long, env = "CALYX_NODE_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    node_timeout_seconds: u64,
    /// Do not write firewall rules (for hosts where something else owns them).
    #[arg(long, env = "CALYX_NO_FIREWALL")]
    no_firewall: bool,
    #[arg(long, env = "CALYX_LOG", default_value = "info")]
    log_level: String,
    #[arg(long, env = "CALYX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[arg(long, env = "CALYX_CONFIG")]
    config: Option<PathBuf>,
}

/// `--vxlan-device`: a name the kernel takes as it is (the plugin's CNI_IFNAME rules).
fn parse_ifname(name: &str) -> Result<String, String> {
    calyx_dataplane::validate_ifname(name)
        .map(|()| name.to_string())
        .map_err(|why| format!("{name:?}: {why}"))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    if let Err(e) = load_config_file() {
        eprintln!("calyx-agent: {e:#}");
        return ExitCode::from(2);
    }
    let args = Args::parse();
    init_logging(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("calyx-agent: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "calyx-agent stopped");
            ExitCode::FAILURE
        }
    }
}

/// Puts the config file's keys into the environment (unless already set there), so
/// clap's order applies: flag, then environment, then file, then default. Runs before
/// any thread exists.
fn load_config_file() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let from_flag = argv
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| argv.get(i + 1).cloned())
        .or_else(|| {
            argv.iter()
                .find_map(|a| a.strip_prefix("--config=").map(str::to_string))
        });
    let Some(path) = from_flag.or_else(|| std::env::var("CALYX_CONFIG").ok()) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("--config {path}"))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("--config {path}: not JSON"))?;
    let obj = doc
        .as_object()
        .with_context(|| format!("--config {path}: expected a JSON object"))?;
    for (key, value) in obj {
        let mut env = String::from("CALYX_");
        for c in key.chars() {
            if c.is_ascii_uppercase() {
                env.push('_');
            }
            env.push(c.to_ascii_uppercase());
        }
        let value = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        if std::env::var_os(&env).is_none() {
            std::env::set_var(env, value);
        }
    }
    Ok(())
}

fn init_logging(args: &Args) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Why a reconcile runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Startup,
    Datastore,
    Kernel,
    Resync,
}

struct Agent {
    ipam: Ipam<'static>,
    nl: Netlink,
    node: String,
    device: DeviceConfig,
    liveness: Liveness,
    metrics: Arc<Metrics>,
    firewall: bool,
    applied_rules: [Option<Vec<String>>; 2],
    device_index: Arc<std::sync::atomic::AtomicU32>,
    cluster: Arc<ClusterCache>,
    /// A full run was asked for before the cluster had been read: do it then.
    full_pending: bool,
}

async fn run(args: Args) -> anyhow::Result<()> {
    // The agent lives as long as the process; a 'static store lets every task share it.
    let store: &'static dyn Store = Box::leak(store::open(&args.datastore)?);
    let ipam = Ipam::new(store);
    // Health from the first second, whatever the datastore does meanwhile.
    let metrics = Metrics::new(Duration::from_secs(args.resync_seconds));
    {
        let metrics = metrics.clone();
        let addr = args.metrics_addr;
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, metrics).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    let nl = Netlink::current()?;
    let underlay =
        registration::detect_underlay(&nl, args.underlay_interface.as_deref(), args.underlay_ip)
            .await?;
    let mtu = args
        .mtu
        .unwrap_or(underlay.link.mtu - registration::vxlan_overhead(underlay.ip));
    tracing::info!(node = %args.node_name, underlay = %underlay.ip, interface = %underlay.link.name, mtu, "starting");

    let pools: Vec<Pool> = args
        .pools
        .iter()
        .map(|cidr| {
            let block_size = if cidr.is_ipv4() {
                args.block_size
            } else {
                args.block_size_v6
            };
            Pool::with_defaults(*cidr, block_size)
                .map_err(|e| anyhow::anyhow!("--pool {cidr}: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    metrics.starting("waiting for the datastore (pools)");
    registration::retry_while_waiting("create the --pool pools", || ipam.ensure_pools(&pools))
        .await?;
    metrics.starting("waiting for the datastore (tunnel addresses)");
    let vtep_ips = registration::tunnel_addresses(&ipam, &args.node_name).await?;
    let mac = registration::vtep_mac(&args.node_name);
    registration::write_state_files(&args.state_dir, &args.node_name, mtu)?;
    let record = registration::register(
        &ipam,
        NodeRecord {
            name: args.node_name.clone(),
            underlay_ip: underlay.ip,
            vtep_ipv4: vtep_ips.iter().copied().find(IpAddr::is_ipv4),
            vtep_ipv6: vtep_ips.iter().copied().find(IpAddr::is_ipv6),
            vtep_mac: calyx_dataplane::format_mac(&mac),
            heartbeat: 0,
        },
    )
    .await?;
    tracing::info!(node = %registration::describe(&record), "registered");

    sysctl::set("net.ipv4.ip_forward", "1")?;
    if vtep_ips.iter().any(IpAddr::is_ipv6) {
        sysctl::set("net.ipv6.conf.all.forwarding", "1")?;
    }

    metrics.starting("first reconcile has not completed");

    let (trigger_tx, mut trigger_rx) = mpsc::unbounded_channel::<Trigger>();
    let device_index = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let cluster = {
        let trigger = trigger_tx.clone();
        ClusterCache::spawn(
            store,
            Arc::new(move || {
                trigger.send(Trigger::Datastore).ok();
            }),
        )
    };
    spawn_kernel_events(trigger_tx.clone(), device_index.clone())?;
    let heartbeat_problem = Arc::new(std::sync::Mutex::new(None::<String>));
    spawn_timers(
        &args,
        store,
        trigger_tx.clone(),
        record,
        heartbeat_problem.clone(),
    );
    {
        let cluster = cluster.clone();
        metrics.set_readiness_check(move || {
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

    let mut agent = Agent {
        ipam,
        nl,
        node: args.node_name.clone(),
        device: DeviceConfig {
            spec: VxlanSpec {
                name: args.vxlan_device.clone(),
                vni: args.vxlan_vni,
                port: args.vxlan_port,
                local: underlay.ip,
                underlay_index: underlay.link.index,
                mac,
                mtu,
            },
            vtep_ips,
        },
        liveness: Liveness::new(
            &args.node_name,
            Duration::from_secs(args.node_timeout_seconds),
        ),
        metrics,
        firewall: !args.no_firewall,
        applied_rules: [None, None],
        device_index,
        cluster,
        full_pending: false,
    };
    trigger_tx.send(Trigger::Startup).ok();

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let retry_cap = Duration::from_secs(args.resync_seconds);
    // A failed run, retried after its backoff whether or not anything else triggers.
    let mut retry: Option<(Trigger, bool)> = None;
    let mut failures = 0u32;
    loop {
        let wait = match retry {
            Some(_) => failure_backoff(failures, retry_cap),
            None => retry_cap, // unused: the branch is off
        };
        let (trigger, mut full) = tokio::select! {
            t = trigger_rx.recv(), if retry.is_none() => {
                let t = t.unwrap_or(Trigger::Resync);
                (t, matches!(t, Trigger::Startup | Trigger::Resync))
            }
            _ = tokio::time::sleep(wait), if retry.is_some() => retry.take().expect("set"),
            _ = sigterm.recv() => {
                // Leave the dataplane as it is: pods keep working while the agent is away.
                tracing::info!("SIGTERM: exiting, dataplane left in place");
                return Ok(());
            }
        };
        // Coalesce a burst of triggers (and what came in during a backoff: a failing
        // run's own kernel events among them) into one run; full if any asked for it.
        tokio::time::sleep(Duration::from_millis(10)).await;
        while let Ok(t) = trigger_rx.try_recv() {
            full |= matches!(t, Trigger::Startup | Trigger::Resync);
        }
        if agent.reconcile(trigger, full).await {
            failures = 0;
        } else {
            failures += 1;
            retry = Some((trigger, full));
        }
    }
}

/// How long to wait before retrying after `failures` failed runs in a row: 200 ms,
/// doubling, at most `cap` (the resync interval), so a run that keeps failing (and
/// keeps waking itself through its own kernel events) does not spin.
fn failure_backoff(failures: u32, cap: Duration) -> Duration {
    let wait = Duration::from_millis(200).saturating_mul(1 << failures.saturating_sub(1).min(16));
    wait.min(cap)
}

impl Agent {
    /// One run; says whether it succeeded.
    async fn reconcile(&mut self, trigger: Trigger, full: bool) -> bool {
        let started = Instant::now();
        self.metrics.reconciles.inc();
        match self.reconcile_once(full).await {
            Ok(changes) => {
                self.metrics.succeeded();
                let elapsed = started.elapsed();
                if changes > 0 || trigger == Trigger::Startup {
                    tracing::info!(
                        ?trigger,
                        changes,
                        elapsed_ms = elapsed.as_secs_f64() * 1e3,
                        "reconciled"
                    );
                } else {
                    tracing::debug!(
                        ?trigger,
                        elapsed_ms = elapsed.as_secs_f64() * 1e3,
                        "reconciled, nothing to do"
                    );
                }
            }
            Err(e) => {
                self.metrics.reconcile_errors.inc();
                tracing::error!(
                    ?trigger,
                    error = format!("{e:#}"),
                    "reconcile failed; will retry after a backoff"
                );
                self.metrics
                    .reconcile_seconds
                    .observe(started.elapsed().as_secs_f64());
                return false;
            }
        }
        self.metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        true
    }

    async fn reconcile_once(&mut self, full: bool) -> anyhow::Result<usize> {
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
        phase("liveness");
        let (device, device_changed) = kernel::ensure_device(&self.nl, &self.device).await?;
        self.device_index
            .store(device.index, std::sync::atomic::Ordering::Relaxed);

        phase("device ensured");
        let me = self.node.clone();
        let liveness = &self.liveness;
        let desired = desired::desired_overlay(&me, &nodes, &|n| liveness.is_live(n, now), &blocks);
        phase("desired state computed");
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
            rule_changes = self.ensure_firewall().await?;
        }
        if !errors.is_empty() {
            anyhow::bail!(
                "{} of {} overlay changes failed: {}",
                errors.len(),
                changes.count(),
                errors.join("; ")
            );
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

    async fn ensure_firewall(&mut self) -> anyhow::Result<usize> {
        let pools = self.ipam.pools().await?;
        let mut changed = 0;
        for (i, family) in [rules::Family::V4, rules::Family::V6]
            .into_iter()
            .enumerate()
        {
            let wanted = pools
                .iter()
                .any(|p| p.is_ipv4() == (family == rules::Family::V4));
            if !wanted {
                continue;
            }
            if rules::ensure(&pools, family, &mut self.applied_rules[i]).await? {
                self.metrics.firewall_repairs.inc();
                changed += 1;
            }
        }
        Ok(changed)
    }
}

/// Someone deleting our device, a neighbour or FDB entry on it, or one of our routes
/// triggers a reconcile at once.
fn spawn_kernel_events(
    trigger: mpsc::UnboundedSender<Trigger>,
    device_index: Arc<std::sync::atomic::AtomicU32>,
) -> anyhow::Result<()> {
    let mut events = monitor()?;
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let ours = device_index.load(std::sync::atomic::Ordering::Relaxed);
            let relevant = match event {
                KernelEvent::Link { index, deleted } => deleted && index == ours,
                KernelEvent::Neighbour { index, deleted } => deleted && index == ours,
                KernelEvent::Route {
                    deleted, protocol, ..
                } => deleted && protocol == CALYX_ROUTE_PROTOCOL,
            };
            if relevant {
                trigger.send(Trigger::Kernel).ok();
            }
        }
    });
    Ok(())
}

/// The resync timer, and the heartbeat: bumps the node record every
/// --heartbeat-seconds, registers the node again when its record vanished, and says
/// in `problem` (for /readyz) when it cannot.
fn spawn_timers(
    args: &Args,
    store: &'static dyn Store,
    trigger: mpsc::UnboundedSender<Trigger>,
    registered: NodeRecord,
    problem: Arc<std::sync::Mutex<Option<String>>>,
) {
    let resync = Duration::from_secs(args.resync_seconds.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(resync);
        tick.tick().await;
        loop {
            tick.tick().await;
            if trigger.send(Trigger::Resync).is_err() {
                return;
            }
        }
    });
    let heartbeat = Duration::from_secs(args.heartbeat_seconds.max(1));
    let node = args.node_name.clone();
    tokio::spawn(async move {
        let ipam = Ipam::new(store);
        let mut tick = tokio::time::interval(heartbeat);
        let set_problem = |why: Option<String>| {
            *problem.lock().unwrap_or_else(|e| e.into_inner()) = why;
        };
        loop {
            tick.tick().await;
            let key = calyx_ipam::model::node_key(&node);
            // A frozen datastore answers nothing: a deadline turns that into a problem.
            let current = tokio::time::timeout(heartbeat * 2, ipam.store().get(&key)).await;
            let record = match current {
                Ok(Ok(Some(v))) => match serde_json::from_str::<NodeRecord>(&v.value) {
                    Ok(mut record) => {
                        record.heartbeat += 1;
                        record
                    }
                    Err(e) => {
                        tracing::error!(%key, error = %e, "heartbeat: node record unreadable");
                        set_problem(Some(format!("{key} unreadable: {e}")));
                        continue;
                    }
                },
                Ok(Ok(None)) => {
                    tracing::error!(%key, "NODE RECORD VANISHED from the datastore; registering again");
                    registered.clone()
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "heartbeat: datastore unavailable");
                    set_problem(Some(e.to_string()));
                    continue;
                }
                Err(_) => {
                    tracing::warn!("heartbeat: the datastore did not answer in time");
                    set_problem(Some("the datastore did not answer in time".into()));
                    continue;
                }
            };
            match tokio::time::timeout(heartbeat * 2, registration::register(&ipam, record)).await {
                Ok(Ok(_)) => set_problem(None),
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "heartbeat failed");
                    set_problem(Some(format!("{e:#}")));
                }
                Err(_) => set_problem(Some("the datastore did not answer in time".into())),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_doubling_up_to_the_resync_interval() {
        let cap = Duration::from_secs(10);
        let waits: Vec<u128> = (1..=8)
            .map(|n| failure_backoff(n, cap).as_millis())
            .collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        assert_eq!(failure_backoff(1000, cap), cap);
    }
}
