//! The policy controller: the latest snapshot of pods, namespaces and policies in,
//! this node's `inet calyx-policy` table out. Nothing is written until the source has
//! listed everything once, so a restarting agent keeps what the kernel enforces until
//! it knows better; a restart with the table already right writes nothing. A node
//! without the table gets its empty form at once, which isolates nobody but stops
//! spoofing from the first pod on.

use std::sync::Arc;
use std::time::Instant;

use calyx_dataplane::firewall::nft::{self, Backend, Family, TableSync};

use super::holds::Holds;
use super::model::{Cluster, Direction};
use super::table::{build, desired_table, Built, TABLE};
use crate::metrics::Metrics;
use crate::runtime::{Controller, Trigger};
use crate::source::{PodAddresses, Snapshot};

/// The inputs a write was computed from.
struct Applied {
    source: Arc<Cluster>,
    allocations: Option<Arc<PodAddresses>>,
    /// The cluster they made, the allocations' addresses merged in.
    cluster: Arc<Cluster>,
}

pub struct PolicyController {
    node: String,
    snapshot: Snapshot<Cluster>,
    /// Which pod holds which address, from the IPAM store.
    allocations: Option<Snapshot<PodAddresses>>,
    backend: Box<dyn Backend>,
    sync: TableSync,
    /// What was last written; None until then and after a failed write.
    applied: Option<Applied>,
    /// New pods held until classified (None: nothing to release, as in unit tests).
    holds: Option<Holds>,
    /// The last table computed, which the next change patches.
    built: Option<Built>,
    metrics: Arc<Metrics>,
    /// Whether a sync has succeeded yet (the first is logged).
    synced: bool,
    /// Whether the kernel was looked at before the first snapshot.
    looked_before_listing: bool,
}

impl PolicyController {
    pub fn new(
        node: String,
        snapshot: Snapshot<Cluster>,
        allocations: Option<Snapshot<PodAddresses>>,
        backend: Box<dyn Backend>,
        holds: Option<Holds>,
        metrics: Arc<Metrics>,
    ) -> PolicyController {
        // No readiness check: without an API (or before it answers) there is nothing to
        // enforce, and pods are networked regardless.
        PolicyController {
            node,
            snapshot,
            allocations,
            holds,
            built: None,
            backend,
            sync: TableSync::new(),
            applied: None,
            metrics,
            synced: false,
            looked_before_listing: false,
        }
    }

    /// Before anything is listed: a node without the table gets the table of no
    /// policies (the spoofing guard); a table already there is left as it is.
    fn before_listing(&mut self) -> bool {
        if self.looked_before_listing {
            return true;
        }
        // Whether the table is there at all: its chain names say, without reading
        // its rules and elements (the sync reads the kernel itself).
        let written = tokio::task::block_in_place(|| {
            match self.backend.chain_names(Family::Inet, TABLE)? {
                Some(_) => Ok(false),
                None => self
                    .sync
                    .sync(
                        self.backend.as_ref(),
                        &desired_table(&Cluster::default(), &self.node),
                        true,
                    )
                    .map(|_| true),
            }
        });
        match written {
            Ok(written) => {
                if written {
                    tracing::info!("policy table written without policies until they are listed: pods' sources are checked");
                }
                self.looked_before_listing = true;
                true
            }
            Err(e) => {
                self.metrics.policy.sync_errors.inc();
                tracing::error!(error = %e, "cannot write the policy table");
                false
            }
        }
    }

    /// Releases the held veths of the pods `cluster` classifies on this node, and
    /// tells the plugin where to hold new ones.
    async fn release_held(&mut self, cluster: &Cluster) -> bool {
        let Some(holds) = &mut self.holds else {
            return true;
        };
        if let Err(e) = holds.write_namespaces(cluster.namespaces_with_policies()) {
            tracing::warn!(error = %e, "cannot tell the plugin which namespaces to hold new pods in");
        }
        let classified = cluster
            .pods
            .values()
            .filter(|p| p.node == self.node && !p.host_network)
            .flat_map(|p| p.addresses.iter().copied())
            .collect();
        match holds.release(&classified).await {
            Ok(released) => {
                for veth in released {
                    tracing::debug!(veth, "released a held pod: its entries are written");
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot release held pods");
                false
            }
        }
    }

    fn record(&self, cluster: &Cluster) {
        let local: Vec<_> = cluster
            .pods
            .values()
            .filter(|p| p.node == self.node && !p.host_network)
            .collect();
        let mut policies = std::collections::BTreeSet::new();
        let mut pods = 0;
        for pod in &local {
            let mut isolated = false;
            for direction in [Direction::Ingress, Direction::Egress] {
                for policy in cluster.isolating(pod, direction) {
                    policies.insert((policy.key.clone(), direction));
                    isolated = true;
                }
            }
            pods += isolated as i64;
        }
        self.metrics.policy.policies.set(policies.len() as i64);
        self.metrics.policy.pods.set(pods);
    }
}

impl Controller for PolicyController {
    fn name(&self) -> &'static str {
        "policy"
    }

    async fn reconcile(&mut self, trigger: Trigger, full: bool) -> bool {
        let Some(source) = self.snapshot.borrow_and_update().clone() else {
            // Not listed yet: whatever the kernel enforces stays.
            return self.before_listing();
        };
        let allocations = self
            .allocations
            .as_mut()
            .and_then(|a| a.borrow_and_update().clone());
        let mut full = full;
        if trigger == Trigger::Check {
            match tokio::task::block_in_place(|| self.sync.drifted(self.backend.as_ref())) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::warn!(
                        "the policy table lost chains since the last sync: rewriting it"
                    );
                    full = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the policy table back");
                    return false;
                }
            }
        }
        if let Some(applied) = self.applied.as_ref().filter(|a| {
            !full
                && Arc::ptr_eq(&a.source, &source)
                && match (&a.allocations, &allocations) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                }
        }) {
            // Nothing new to write; a pod's veth may have got its routes since.
            let cluster = applied.cluster.clone();
            return self.release_held(&cluster).await;
        }
        let started = Instant::now();
        let cluster = match &allocations {
            Some(allocated) => Arc::new(source.with_allocations(&allocated.pods)),
            None => source.clone(),
        };
        let merged = started.elapsed();
        // A full sync computes everything afresh; a change patches the last build.
        let previous = if full { None } else { self.built.take() };
        let built = build(&cluster, &self.node, previous.as_ref());
        let computed = started.elapsed();
        let table = &built.table;
        let result =
            tokio::task::block_in_place(|| self.sync.sync(self.backend.as_ref(), table, full));
        self.built = Some(built);
        let elapsed = started.elapsed();
        match result {
            Ok(tx) => {
                let histogram = if full {
                    &self.metrics.policy.full_sync_seconds
                } else {
                    &self.metrics.policy.partial_sync_seconds
                };
                histogram.observe(elapsed.as_secs_f64());
                self.record(&cluster);
                let first = !std::mem::replace(&mut self.synced, true);
                if first || !tx.ops.is_empty() {
                    // The first sync says isolation is in force; each later write says
                    // what it cost.
                    tracing::info!(
                        first,
                        full,
                        writes = tx.ops.len(),
                        policies = self.metrics.policy.policies.get(),
                        pods = self.metrics.policy.pods.get(),
                        elapsed_ms = elapsed.as_secs_f64() * 1e3,
                        merge_ms = merged.as_secs_f64() * 1e3,
                        compute_ms = (computed - merged).as_secs_f64() * 1e3,
                        "network policy synced"
                    );
                } else {
                    tracing::debug!(
                        full,
                        elapsed_ms = elapsed.as_secs_f64() * 1e3,
                        "network policy synced, nothing to write"
                    );
                }
                self.applied = Some(Applied {
                    source,
                    allocations,
                    cluster: cluster.clone(),
                });
                self.release_held(&cluster).await
            }
            Err(e) => {
                self.metrics.policy.sync_errors.inc();
                tracing::error!(error = %e, "policy table not written; the kernel keeps what it had");
                self.applied = None;
                false
            }
        }
    }
}

/// With `--network-policy off`: the table goes, if an earlier run left it.
pub fn remove_table(backend: &dyn Backend) {
    let result = backend.dump(Family::Inet, TABLE).and_then(|current| {
        let tx = nft::plan_removal(current.as_ref(), Family::Inet, TABLE);
        if tx.is_empty() {
            Ok(false)
        } else {
            backend.apply(&tx).map(|()| true)
        }
    });
    match result {
        Ok(true) => tracing::info!("network policy is off: removed the policy table"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot remove the policy table"),
    }
}

#[cfg(test)]
mod tests {
    use calyx_dataplane::firewall::nft::RecordingNft;

    use super::*;
    use crate::policy::model::*;
    use crate::runtime::Triggers;
    use crate::source::Publisher;

    fn cluster(deny: bool) -> Cluster {
        let mut c = Cluster::default();
        let key = PodKey {
            namespace: "x".into(),
            name: "a".into(),
        };
        c.pods.insert(
            key.clone(),
            Pod {
                key,
                labels: Labels::new(),
                node: "n1".into(),
                addresses: vec!["10.244.1.5".parse().unwrap()],
                named_ports: Vec::new(),
                host_network: false,
            },
        );
        if deny {
            let key = PolicyKey {
                namespace: "x".into(),
                name: "deny".into(),
            };
            c.policies.insert(
                key.clone(),
                Policy {
                    key,
                    pod_selector: Selector::everything(),
                    ingress: Some(Vec::new()),
                    egress: None,
                },
            );
        }
        c
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn nothing_is_written_before_the_first_snapshot_then_only_changes() {
        let fake = Arc::new(RecordingNft::new());
        let (triggers, _rx) = Triggers::channel();
        let (publisher, snapshot) = Publisher::new(triggers);
        let metrics = Metrics::new(std::time::Duration::from_secs(10));
        let mut c = PolicyController::new(
            "n1".into(),
            snapshot,
            None,
            Box::new(fake.clone()),
            None,
            metrics.clone(),
        );
        assert!(c.reconcile(Trigger::Startup, true).await);
        let scripts = fake.take_scripts();
        assert_eq!(scripts.len(), 1, "the table of no policies, for its guard");
        assert!(
            scripts[0].contains("fib saddr . iif oif missing"),
            "{scripts:?}"
        );
        assert!(!scripts[0].contains("add element"), "{scripts:?}");

        // Pods alone isolate nobody; the table stays as it was.
        publisher.publish(Arc::new(cluster(false)));
        assert!(c.reconcile(Trigger::Source, false).await);
        let scripts = fake.take_scripts();
        assert!(scripts.iter().all(|s| !s.contains("goto")), "{scripts:?}");
        assert!(c.reconcile(Trigger::Resync, true).await);
        assert!(
            fake.take_scripts().is_empty(),
            "a resync of a right table writes nothing"
        );

        publisher.publish(Arc::new(cluster(true)));
        assert!(c.reconcile(Trigger::Source, false).await);
        let scripts = fake.take_scripts();
        assert!(
            scripts[0]
                .contains("add element inet calyx-policy ingress-v4 { 10.244.1.5 : goto ingress-"),
            "{scripts:?}"
        );
        assert_eq!(metrics.policy.pods.get(), 1);

        // A new controller (a restart) over the same kernel writes nothing, neither
        // before its source has listed (the isolation stays) nor after.
        let (triggers, _rx) = Triggers::channel();
        let (publisher, snapshot) = Publisher::new(triggers);
        let mut restarted = PolicyController::new(
            "n1".into(),
            snapshot,
            None,
            Box::new(fake.clone()),
            None,
            metrics,
        );
        assert!(restarted.reconcile(Trigger::Startup, true).await);
        assert!(fake.take_scripts().is_empty());
        publisher.publish(Arc::new(cluster(true)));
        assert!(restarted.reconcile(Trigger::Source, false).await);
        assert!(fake.take_scripts().is_empty());

        remove_table(fake.as_ref());
        assert!(fake.table(Family::Inet, TABLE).is_none());
    }
}
