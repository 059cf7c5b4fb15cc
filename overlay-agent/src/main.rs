//! calyx-agent: one per node, a host of controllers. The overlay controller keeps the
//! VXLAN overlay and the pool rules; the proxy controller (unless --proxy-mode off)
//! makes Services reachable. Each reconciles on its own triggers and resyncs; neither
//! knows the other. Restarting the agent changes nothing that is already right.

mod install;
mod kube_api;
mod metrics;
mod object_files;
mod overlay;
mod policy;
mod protocol;
mod proxy;
mod runtime;
mod source;

/// Static builds link musl, whose allocator is slow for the agent's many small
/// allocations; mimalloc brings large syncs back to glibc's speed (see README's
/// benchmarks).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use calyx_dataplane::firewall::nft::NftCommand;
use calyx_dataplane::Netlink;
use calyx_ipam::store::{self, Store};
use clap::{Parser, ValueEnum};
use ipnetwork::IpNetwork;

use crate::metrics::Metrics;
use crate::overlay::{registration, OverlayConfig, OverlayController};
use crate::policy::controller::PolicyController;
use crate::proxy::{ProxyConfig, ProxyController, ProxyMode};
use crate::runtime::{Schedule, Triggers};
use crate::source::Publisher;

/// Every flag can also come from its environment variable or, below both, from the
/// JSON config file (`--config`, keys in camelCase: {"nodeName": ..., "datastore": ...}).
#[derive(Parser, Debug)]
#[command(
    name = "calyx-agent",
    about = "Calyx per-node overlay agent",
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[arg(
        long,
        env = "CALYX_NODE_NAME",
        required_unless_present = "proxy_cleanup",
        default_value = ""
    )]
    node_name: String,
    #[arg(
        long,
        env = "CALYX_DATASTORE",
        default_value = "file:///var/lib/calyx/store"
    )]
    datastore: String,
    /// A mounted TLS Secret (ca.crt, tls.crt, tls.key) for an etcds:// datastore whose
    /// URL does not name its own files.
    #[arg(long, env = "CALYX_ETCD_TLS_DIR")]
    etcd_tls_dir: Option<PathBuf>,
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
    /// /metrics, /healthz, /livez, /readyz (not 9099: Calico's Felix serves there).
    #[arg(long, env = "CALYX_METRICS_ADDR", default_value = "127.0.0.1:9180")]
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
    /// The service proxy: off (kube-proxy does the job), nftables, iptables or ipvs.
    #[arg(long, env = "CALYX_PROXY_MODE", value_enum, default_value_t = ProxyMode::Off)]
    proxy_mode: ProxyMode,
    /// IPVS mode: the scheduler of Services that name none in their
    /// `calyx.io/ipvs-scheduler` annotation (rr, wrr, lc, sh, mh).
    #[arg(long, env = "CALYX_IPVS_SCHEDULER", default_value = "rr",
          value_parser = clap::builder::PossibleValuesParser::new(["rr", "wrr", "lc", "sh", "mh"]))]
    ipvs_scheduler: String,
    /// IPVS mode: how long a real server whose endpoint went away keeps its open
    /// connections (weight 0, no new ones) before it is removed anyway.
    #[arg(long, env = "CALYX_IPVS_DRAIN_SECONDS", default_value_t = 900)]
    ipvs_drain_seconds: u64,
    /// Read Services and EndpointSlices from this directory instead of the Kubernetes API.
    #[arg(long, env = "CALYX_SERVICES_DIR")]
    services_dir: Option<PathBuf>,
    /// Kubernetes API credentials; default: in-cluster config, then ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Node addresses NodePorts answer on, as CIDRs (default: the underlay address).
    #[arg(long, env = "CALYX_NODEPORT_ADDRESSES", value_delimiter = ',')]
    nodeport_addresses: Vec<IpNetwork>,
    /// How often the service proxy checks that the kernel still holds its rules (its
    /// jumps in the builtin chains, its table and chains), as kube-proxy's syncPeriod.
    #[arg(long, env = "CALYX_PROXY_SYNC_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    proxy_sync_seconds: u64,
    /// How often the service proxy re-reads every rule and recomputes every Service
    /// (kube-proxy's full sync period, one hour; changes are applied as they come).
    #[arg(long, env = "CALYX_PROXY_FULL_SYNC_SECONDS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    proxy_full_sync_seconds: u64,
    /// NetworkPolicy enforcement (the `inet calyx-policy` table): on or off. Off
    /// removes the table an earlier run left.
    #[arg(long, env = "CALYX_NETWORK_POLICY", value_enum, default_value_t = Switch::On)]
    network_policy: Switch,
    /// Remove everything the service proxy created (both modes) and exit.
    #[arg(long)]
    proxy_cleanup: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Install the CNI plugin and its conflist on this node (the DaemonSet's init
    /// container) and exit.
    InstallCni(install::InstallArgs),
    /// Remove everything Calyx put on this node (files, device, routes, rules, state)
    /// except what running pods use, and exit. Safe to run twice.
    Uninstall(install::UninstallArgs),
    /// NetworkPolicy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(clap::Subcommand, Debug)]
enum PolicyCommand {
    /// Whether a flow is allowed, from the Pods, Namespaces and NetworkPolicies of
    /// --services-dir: which policy and rule allow each direction, or which pod is
    /// isolated and by what. Exit code 1 when it is denied, 2 on bad input.
    Explain(policy::explain::ExplainArgs),
}

/// `--vxlan-device`: a name the kernel takes as it is (the plugin's CNI_IFNAME rules).
fn parse_ifname(name: &str) -> Result<String, String> {
    calyx_dataplane::validate_ifname(name)
        .map(|()| name.to_string())
        .map_err(|why| format!("{name:?}: {why}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
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
    if let Some(Command::Policy(PolicyCommand::Explain(explain))) = &args.command {
        return match policy::explain::run(explain) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("calyx-agent policy explain: {e}");
                ExitCode::from(2)
            }
        };
    }
    init_logging(&args);
    if let Some(Command::InstallCni(install)) = &args.command {
        return exit_code(
            install::install_cni(install).map_err(Into::into),
            "install-cni failed",
        );
    }
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
    if let Some(Command::Uninstall(uninstall)) = &args.command {
        return exit_code(
            runtime
                .block_on(install::uninstall(uninstall))
                .map_err(Into::into),
            "uninstall failed",
        );
    }
    exit_code(runtime.block_on(run(args)), "calyx-agent stopped")
}

/// Success, or the error logged with `what` and a failure.
fn exit_code(result: anyhow::Result<()>, what: &str) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{what}");
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

/// The proxy's and the policy controller's schedule: a cheap check of the kernel every
/// --proxy-sync-seconds, a full sync every --proxy-full-sync-seconds, and no gathering
/// of bursts: each run reads the source's latest snapshot, so changes that come in
/// while a run writes are taken together by the next.
fn watch_schedule(args: &Args) -> Schedule {
    Schedule {
        resync: Duration::from_secs(args.proxy_full_sync_seconds),
        check: Some(Duration::from_secs(args.proxy_sync_seconds)),
        coalesce: Duration::ZERO,
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.proxy_cleanup {
        tokio::task::block_in_place(proxy::cleanup_all);
        return Ok(());
    }
    let resync = Duration::from_secs(args.resync_seconds);
    // Health from the first second, whatever the datastore does meanwhile.
    let metrics = Metrics::new(resync);
    {
        let metrics = metrics.clone();
        let addr = args.metrics_addr;
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, metrics).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    // The agent lives as long as the process; a 'static store lets every task share it.
    let datastore = match &args.etcd_tls_dir {
        Some(dir) => store::etcd::with_tls_dir(&args.datastore, dir, dir),
        None => args.datastore.clone(),
    };
    let store: &'static dyn Store = Box::leak(store::open(&datastore)?);
    let nl = Netlink::current()?;
    let underlay =
        registration::detect_underlay(&nl, args.underlay_interface.as_deref(), args.underlay_ip)
            .await?;

    // The proxy and the policy controller first: they need no datastore, so Services
    // and isolation work while the overlay waits.
    let proxy_triggers = Triggers::channel();
    let (proxy_publisher, proxy_snapshot) = Publisher::new(proxy_triggers.0.clone());
    let policy_triggers = Triggers::channel();
    let (policy_publisher, policy_snapshot) = Publisher::new(policy_triggers.0.clone());
    // The IPAM store's pods, handed over by the overlay's datastore cache.
    let (pods_publisher, pods_snapshot) = Publisher::new(policy_triggers.0.clone());
    let proxy_on = args.proxy_mode != ProxyMode::Off;
    let policy_on = args.network_policy == Switch::On;
    let mut proxy_publisher = proxy_on.then_some(proxy_publisher);
    let mut policy_publisher = policy_on.then_some(policy_publisher);
    // One source for both controllers: the directory, else the Kubernetes API.
    match &args.services_dir {
        Some(dir) => {
            tracing::info!(dir = %dir.display(), proxy = proxy_on, network_policy = policy_on, "objects from a directory");
            source::dir::spawn(
                dir.clone(),
                args.node_name.clone(),
                proxy_publisher.take(),
                policy_publisher.take(),
            );
        }
        None if proxy_on || policy_on => source::kube::spawn(
            args.kubeconfig.clone(),
            args.node_name.clone(),
            source::kube::Publishers {
                proxy: proxy_publisher.take(),
                policy: policy_publisher.take(),
            },
        ),
        None => {}
    }
    let policy = if policy_on {
        let (triggers, rx) = policy_triggers;
        policy::holds::wake_on_pod_routes(triggers.clone())?;
        metrics.policy.read_counts_with(Box::new(|| {
            use calyx_dataplane::firewall::nft::Family;
            match NftCommand::counters(Family::Inet, policy::table::TABLE) {
                Ok(counters) => policy::table::kernel_counts(counters.unwrap_or_default()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the policy counters");
                    Vec::new()
                }
            }
        }));
        let controller = PolicyController::new(
            args.node_name.clone(),
            policy_snapshot,
            Some(pods_snapshot),
            Box::new(NftCommand),
            Some(policy::holds::Holds::new(
                Netlink::current()?,
                args.state_dir.clone(),
            )),
            metrics.clone(),
        );
        Some(tokio::spawn(runtime::run(
            controller,
            triggers,
            rx,
            watch_schedule(&args),
        )))
    } else {
        tokio::task::block_in_place(|| policy::controller::remove_table(&NftCommand));
        policy::holds::release_all(&args.state_dir).await;
        None
    };
    let proxy = match args.proxy_mode {
        ProxyMode::Off => {
            tokio::task::block_in_place(proxy::cleanup_stale);
            None
        }
        mode => {
            let (triggers, rx) = proxy_triggers;
            let config = ProxyConfig {
                mode,
                node_name: args.node_name.clone(),
                nodeport_addresses: if args.nodeport_addresses.is_empty() {
                    vec![IpNetwork::from(underlay.ip)]
                } else {
                    args.nodeport_addresses.clone()
                },
                ipvs_scheduler: args.ipvs_scheduler.clone(),
                ipvs_drain: Duration::from_secs(args.ipvs_drain_seconds),
            };
            let controller = ProxyController::start(config, metrics.clone(), proxy_snapshot)?;
            Some(tokio::spawn(runtime::run(
                controller,
                triggers,
                rx,
                watch_schedule(&args),
            )))
        }
    };

    let config = OverlayConfig {
        node_name: args.node_name.clone(),
        vxlan_device: args.vxlan_device.clone(),
        vxlan_vni: args.vxlan_vni,
        vxlan_port: args.vxlan_port,
        mtu: args.mtu,
        pools: args.pools.clone(),
        block_size: args.block_size,
        block_size_v6: args.block_size_v6,
        state_dir: args.state_dir.clone(),
        heartbeat: Duration::from_secs(args.heartbeat_seconds),
        node_timeout: Duration::from_secs(args.node_timeout_seconds),
        firewall: !args.no_firewall,
        kubeconfig: args.kubeconfig.clone(),
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (triggers, rx) = Triggers::channel();
    let overlay = tokio::select! {
        started = OverlayController::start(
            config,
            store,
            nl,
            &underlay,
            metrics,
            triggers.clone(),
            policy_on.then_some(pods_publisher),
        ) => started?,
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM while starting: exiting, dataplane left in place");
            return Ok(());
        }
    };
    let overlay = tokio::spawn(runtime::run(
        overlay,
        triggers,
        rx,
        Schedule::resync(resync),
    ));
    sigterm.recv().await;
    // Leave the dataplane as it is: pods and Services keep working while the agent is away.
    tracing::info!("SIGTERM: exiting, dataplane left in place");
    overlay.abort();
    if let Some(proxy) = proxy {
        proxy.abort();
    }
    if let Some(policy) = policy {
        policy.abort();
    }
    Ok(())
}
