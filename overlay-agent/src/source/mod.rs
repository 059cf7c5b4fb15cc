//! Where the agent's controllers get the cluster's objects: one source per kind of
//! input, shared. `dir` reads a directory of objects once per change for the proxy
//! and the policy controller alike; the Kubernetes API watches live under each
//! controller for now (`proxy::source::kube`). A source publishes whole snapshots; a
//! controller programs nothing until the first one is in.

pub mod dir;
pub mod kube;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::runtime::{Trigger, Triggers};

/// The latest snapshot; None until the source has listed everything once.
pub type Snapshot<T> = watch::Receiver<Option<Arc<T>>>;

/// A source's side: publish a snapshot and wake the controller.
pub struct Publisher<T> {
    tx: watch::Sender<Option<Arc<T>>>,
    triggers: Triggers,
}

impl<T> Publisher<T> {
    pub fn new(triggers: Triggers) -> (Publisher<T>, Snapshot<T>) {
        let (tx, rx) = watch::channel(None);
        (Publisher { tx, triggers }, rx)
    }

    /// False once the controller is gone.
    pub fn publish(&self, state: Arc<T>) -> bool {
        self.tx.send_replace(Some(state));
        self.triggers.fire(Trigger::Source)
    }
}

/// Which pod holds each address, as the IPAM store's blocks say: known when ADD
/// allocates, seconds before the API reports status.podIPs. Keyed by (namespace, pod).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodAddresses {
    pub pods: BTreeMap<(String, String), Vec<IpAddr>>,
}
