//! /metrics (Prometheus text), /healthz and /readyz.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub struct Metrics {
    pub nodes_known: Gauge,
    pub nodes_live: Gauge,
    pub routes: Gauge,
    pub fdb_entries: Gauge,
    pub neighbours: Gauge,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub kernel_changes: Counter,
    pub firewall_repairs: Counter,
    pub reconcile_seconds: Histogram,
    registry: Registry,
    pub ready: AtomicBool,
    last_success: Mutex<Option<Instant>>,
    /// When the overlay last tried to reconcile, whatever came of it (for /livez).
    last_attempt: Mutex<Option<Instant>>,
    starting: Mutex<String>,
    readiness_checks: Mutex<Vec<ReadinessCheck>>,
    pub resync_ms: AtomicU64,
    pub proxy: ProxyMetrics,
    pub policy: PolicyMetrics,
}

type ReadinessCheck = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// The service proxy's figures (`calyx_agent_proxy_*`).
pub struct ProxyMetrics {
    pub full_sync_seconds: Histogram,
    pub partial_sync_seconds: Histogram,
    pub network_programming_seconds: Histogram,
    pub services: Gauge,
    pub endpoints: Gauge,
    pub sync_errors: Counter,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
}

impl ProxyMetrics {
    fn new() -> ProxyMetrics {
        ProxyMetrics {
            full_sync_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            partial_sync_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            network_programming_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            services: Gauge::default(),
            endpoints: Gauge::default(),
            sync_errors: Counter::default(),
            last_sync_timestamp: Gauge::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("proxy");
        r.register(
            "full_sync_duration_seconds",
            "Full proxy syncs (kernel re-read, everything compared)",
            self.full_sync_seconds.clone(),
        );
        r.register(
            "partial_sync_duration_seconds",
            "Proxy syncs that wrote only what changed",
            self.partial_sync_seconds.clone(),
        );
        r.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to its rules in the kernel",
            self.network_programming_seconds.clone(),
        );
        r.register(
            "services_programmed",
            "Service ports programmed",
            self.services.clone(),
        );
        r.register(
            "endpoints_programmed",
            "Endpoints programmed",
            self.endpoints.clone(),
        );
        r.register(
            "sync_errors",
            "Proxy syncs that failed",
            self.sync_errors.clone(),
        );
        r.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last successful proxy sync",
            self.last_sync_timestamp.clone(),
        );
    }
}

/// One of the kernel's packet counters, as /metrics shows it: `calyx_agent_policy_<name>_packets_total`
/// and `..._bytes_total`, with its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCount {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub packets: u64,
    pub bytes: u64,
}

/// Reads the kernel's counters at each scrape.
pub type CountReader = Box<dyn Fn() -> Vec<KernelCount> + Send + Sync>;

/// The kernel's counts, read when /metrics is scraped: the agent does no per-packet work.
struct KernelCounts {
    read: Mutex<Option<CountReader>>,
    /// Another counter kept outside the kernel, read at the same time.
    refused: &'static AtomicU64,
}

impl std::fmt::Debug for KernelCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCounts")
    }
}

impl prometheus_client::collector::Collector for KernelCounts {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let counter = ConstCounter::new(self.refused.load(Ordering::Relaxed));
        let metric = encoder.encode_descriptor(
            "refused",
            "NetworkPolicies refused as the API server would refuse them (each time one is read; see the log for file, object and field)",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)?;
        let counts = match &*self.read.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(read) => read(),
            None => return Ok(()),
        };
        let mut names: Vec<(&'static str, &'static str)> =
            counts.iter().map(|c| (c.name, c.help)).collect();
        names.dedup();
        for (name, help) in names {
            for (unit, value) in [("packets", 0), ("bytes", 1)] {
                let full = format!("{name}_{unit}");
                let mut metric = encoder.encode_descriptor(
                    &full,
                    help,
                    None,
                    prometheus_client::metrics::MetricType::Counter,
                )?;
                for count in counts.iter().filter(|c| c.name == name) {
                    let v = if value == 0 {
                        count.packets
                    } else {
                        count.bytes
                    };
                    let family = metric.encode_family(&count.labels)?;
                    ConstCounter::new(v).encode(family)?;
                }
            }
        }
        Ok(())
    }
}

/// The policy controller's figures (`calyx_agent_policy_*`).
pub struct PolicyMetrics {
    pub full_sync_seconds: Histogram,
    pub partial_sync_seconds: Histogram,
    pub policies: Gauge,
    pub pods: Gauge,
    pub sync_errors: Counter,
    counts: Arc<KernelCounts>,
}

impl PolicyMetrics {
    fn new() -> PolicyMetrics {
        PolicyMetrics {
            full_sync_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            partial_sync_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            policies: Gauge::default(),
            pods: Gauge::default(),
            sync_errors: Counter::default(),
            counts: Arc::new(KernelCounts {
                read: Mutex::new(None),
                refused: &crate::policy::parse::POLICIES_REFUSED,
            }),
        }
    }

    /// Where the kernel's counters come from (the policy table's, when policy is on).
    pub fn read_counts_with(&self, read: CountReader) {
        *self.counts.read.lock().unwrap_or_else(|e| e.into_inner()) = Some(read);
    }

    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("policy");
        r.register_collector(Box::new(self.counts.clone()));
        r.register(
            "full_sync_duration_seconds",
            "Full policy syncs (kernel re-read, whole table compared)",
            self.full_sync_seconds.clone(),
        );
        r.register(
            "partial_sync_duration_seconds",
            "Policy syncs on a change, against what was written last",
            self.partial_sync_seconds.clone(),
        );
        r.register(
            "policies_programmed",
            "NetworkPolicies isolating a pod of this node, per direction",
            self.policies.clone(),
        );
        r.register(
            "pods_programmed",
            "Pods of this node isolated in at least one direction",
            self.pods.clone(),
        );
        r.register(
            "sync_errors",
            "Policy syncs that failed",
            self.sync_errors.clone(),
        );
    }
}

impl Metrics {
    pub fn new(resync: Duration) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("calyx_agent");
        let m = Metrics {
            nodes_known: Gauge::default(),
            nodes_live: Gauge::default(),
            routes: Gauge::default(),
            fdb_entries: Gauge::default(),
            neighbours: Gauge::default(),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            kernel_changes: Counter::default(),
            firewall_repairs: Counter::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            registry: Registry::default(),
            ready: AtomicBool::new(false),
            last_success: Mutex::new(None),
            last_attempt: Mutex::new(None),
            starting: Mutex::new("starting".into()),
            readiness_checks: Mutex::new(Vec::new()),
            resync_ms: AtomicU64::new(resync.as_millis() as u64),
            proxy: ProxyMetrics::new(),
            policy: PolicyMetrics::new(),
        };
        m.proxy.register(&mut registry);
        m.policy.register(&mut registry);
        registry.register(
            "nodes_known",
            "Nodes registered in the datastore",
            m.nodes_known.clone(),
        );
        registry.register(
            "nodes_live",
            "Nodes whose heartbeat is current",
            m.nodes_live.clone(),
        );
        registry.register(
            "routes_programmed",
            "Routes to remote blocks",
            m.routes.clone(),
        );
        registry.register("fdb_entries", "VXLAN FDB entries", m.fdb_entries.clone());
        registry.register("neighbours", "VTEP neighbour entries", m.neighbours.clone());
        registry.register("reconciles", "Reconcile runs", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile runs that failed",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "kernel_changes",
            "Overlay entries added or removed",
            m.kernel_changes.clone(),
        );
        registry.register(
            "firewall_repairs",
            "Times the firewall rules were (re)written",
            m.firewall_repairs.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            m.reconcile_seconds.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// What else must hold for /readyz (the datastore followed, the node registered,
    /// the proxy synced): a reason when it does not. Each controller adds its own.
    pub fn add_readiness_check(&self, check: impl Fn() -> Option<String> + Send + Sync + 'static) {
        self.readiness_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(check));
    }

    /// Why the agent is not ready, None when it is.
    fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Some(
                self.starting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            );
        }
        let reasons: Vec<String> = self
            .readiness_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|check| check())
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// What the agent is waiting for while it starts, for /readyz.
    pub fn starting(&self, what: impl Into<String>) {
        *self.starting.lock().unwrap_or_else(|e| e.into_inner()) = what.into();
    }

    pub fn succeeded(&self) {
        *self.last_success.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn attempted(&self) {
        *self.last_attempt.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Alive while the reconcile loop keeps running, whether or not its runs succeed:
    /// an etcd outage fails runs (the kubelet must not restart every agent for it), a
    /// wedged loop runs nothing. Waiting for the datastore at start counts as alive.
    fn alive(&self) -> bool {
        let window = self.three_resyncs();
        self.last_attempt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|t| t.elapsed() <= window)
    }

    /// How long /healthz and /livez give the reconcile loop between runs.
    fn three_resyncs(&self) -> Duration {
        Duration::from_millis(3 * self.resync_ms.load(Ordering::Relaxed))
    }

    /// Healthy while reconciles keep succeeding (within three resync periods).
    fn healthy(&self) -> bool {
        let window = self.three_resyncs();
        self.last_success
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() <= window)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serve /metrics: {0}")]
    Serve(#[source] std::io::Error),
}

pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), ServeError> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    tracing::info!(%addr, "serving /metrics, /healthz, /livez, /readyz");
    axum::serve(listener, app).await.map_err(ServeError::Serve)
}

async fn render(State(m): State<Arc<Metrics>>) -> (StatusCode, String) {
    let mut out = String::new();
    // The kernel's counters are read as the page is written (one `nft` call).
    match tokio::task::block_in_place(|| encode(&mut out, &m.registry)) {
        Ok(()) => (StatusCode::OK, out),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn livez(State(m): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if m.alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the reconcile loop has not run for three resync periods\n",
        )
    }
}

async fn healthz(State(m): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if m.healthy() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no successful reconcile recently\n",
        )
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> (StatusCode, String) {
    match m.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
