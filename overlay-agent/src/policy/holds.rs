//! New pods held until classified. Which pod has which address reaches the agent
//! after ADD has returned (the IPAM store, then the API), so a new pod's first
//! packets would find no entry of theirs in the policy table. Instead the plugin
//! creates the pod's host veth in `HELD_POD_GROUP` when the agent's namespaces file
//! names the pod's namespace (some policy there could isolate it); the table drops
//! what a held veth sends or is sent, its node's traffic and replies aside; and the
//! agent moves the veth back to group 0 once every address routed to it belongs to a
//! pod whose entries it has written. A pod in a namespace without policies is never
//! held, and a held pod stays held while the agent is down.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use calyx_dataplane::{
    DataplaneError, Netlink, CALYX_ROUTE_PROTOCOL, HELD_POD_GROUP, POLICY_NAMESPACES_FILE,
};

pub struct Holds {
    nl: Netlink,
    state_dir: PathBuf,
    /// The namespaces last written to the file.
    written: Option<BTreeSet<String>>,
}

impl Holds {
    pub fn new(nl: Netlink, state_dir: PathBuf) -> Holds {
        Holds {
            nl,
            state_dir,
            written: None,
        }
    }

    /// Tells the plugin which namespaces to hold new pods in, when that changed.
    pub fn write_namespaces(&mut self, namespaces: BTreeSet<String>) -> std::io::Result<()> {
        if self.written.as_ref() == Some(&namespaces) {
            return Ok(());
        }
        let text: String = namespaces.iter().map(|ns| format!("{ns}\n")).collect();
        std::fs::create_dir_all(&self.state_dir)?;
        let tmp = self
            .state_dir
            .join(format!(".{POLICY_NAMESPACES_FILE}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, namespaces_file(&self.state_dir))?;
        self.written = Some(namespaces);
        Ok(())
    }

    /// Releases every held veth whose routed addresses are all `classified`; the
    /// veths released, by name. A veth without routes yet (ADD still wiring it) stays.
    pub async fn release(
        &self,
        classified: &BTreeSet<IpAddr>,
    ) -> Result<Vec<String>, DataplaneError> {
        let mut released = Vec::new();
        for link in self.nl.links_in_group(HELD_POD_GROUP).await? {
            let mut addresses = Vec::new();
            for v4 in [true, false] {
                let routes = self.nl.routes_via(&link, v4, CALYX_ROUTE_PROTOCOL).await?;
                addresses.extend(routes.iter().map(|r| r.destination));
            }
            if !addresses.is_empty() && addresses.iter().all(|ip| classified.contains(ip)) {
                self.nl.set_group(&link, 0).await?;
                released.push(link.name);
            }
        }
        Ok(released)
    }
}

fn namespaces_file(state_dir: &Path) -> PathBuf {
    state_dir.join(POLICY_NAMESPACES_FILE)
}

/// With `--network-policy off`: no pod is held any more, and none will be.
pub async fn release_all(state_dir: &Path) {
    match std::fs::remove_file(namespaces_file(state_dir)) {
        Ok(()) => tracing::info!("network policy is off: new pods are not held"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, "cannot remove the policy namespaces file"),
    }
    let released = async {
        let nl = Netlink::current()?;
        let mut released = 0;
        for link in nl.links_in_group(HELD_POD_GROUP).await? {
            nl.set_group(&link, 0).await?;
            released += 1;
        }
        Ok::<_, DataplaneError>(released)
    };
    match released.await {
        Ok(0) => {}
        Ok(n) => tracing::info!(pods = n, "network policy is off: released held pods"),
        Err(e) => tracing::warn!(error = %e, "cannot release held pods"),
    }
}

/// Wakes the controller when the plugin routes a pod's address to its veth: the
/// moment a held pod can be released if the agent already knows it.
pub fn wake_on_pod_routes(triggers: crate::runtime::Triggers) -> Result<(), DataplaneError> {
    use calyx_dataplane::overlay::{monitor, KernelEvent};
    let mut events = monitor()?;
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let new_pod_route = matches!(
                event,
                KernelEvent::Route {
                    deleted: false,
                    protocol: CALYX_ROUTE_PROTOCOL,
                    ..
                }
            );
            if new_pod_route && !triggers.fire(crate::runtime::Trigger::Kernel) {
                return;
            }
        }
    });
    Ok(())
}
