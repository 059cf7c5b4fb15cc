//! Where the proxy's model comes from: the Kubernetes API (`kube`), or a directory
//! of objects (`dir`). A source publishes whole snapshots; the controller programs
//! nothing until the first one (both streams listed once) is in.

pub mod dir;
pub mod kube;
pub mod objects;

use std::sync::Arc;

use tokio::sync::watch;

use crate::proxy::model::ProxyState;
use crate::runtime::{Trigger, Triggers};

/// The latest snapshot; None until the source has listed everything once.
pub type Snapshot = watch::Receiver<Option<Arc<ProxyState>>>;

/// A source's side: publish a snapshot and wake the controller.
pub struct Publisher {
    tx: watch::Sender<Option<Arc<ProxyState>>>,
    triggers: Triggers,
}

impl Publisher {
    pub fn new(triggers: Triggers) -> (Publisher, Snapshot) {
        let (tx, rx) = watch::channel(None);
        (Publisher { tx, triggers }, rx)
    }

    /// False once the controller is gone.
    pub fn publish(&self, state: Arc<ProxyState>) -> bool {
        self.tx.send_replace(Some(state));
        self.triggers.fire(Trigger::Source)
    }
}
