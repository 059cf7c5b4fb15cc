//! Applies a pod's network to the kernel (ADD), reads it back (CHECK) and removes it
//! (DEL, GC). The plugin process runs in the host's network namespace; the pod's side
//! is reached through a netlink socket opened inside the pod's namespace.

use std::net::IpAddr;
use std::path::Path;

use calyx_dataplane::netlink::{classify_namespace_file, open_namespace, NamespaceFile};
use calyx_dataplane::{
    format_mac, sysctl, Link, Netlink, RouteSpec, CALYX_ROUTE_PROTOCOL, HELD_POD_GROUP,
};

use crate::error::{CniError, CniResult, Code};
use crate::pod_network::{
    gateway_for, host_prefix, host_veth_sysctls, Observed, PodNetwork, HOST_VETH_MAC,
};

/// Links as they exist after ADD.
#[derive(Debug, Clone)]
pub struct WiredLinks {
    pub host: Link,
    pub pod: Link,
}

/// Netlink connections to the host and to one pod namespace, opened before anything
/// is changed so that a bad netns fails ADD before any allocation.
pub struct Connections {
    host: Netlink,
    pod: Netlink,
    netns: calyx_dataplane::NetNs,
}

impl Connections {
    pub fn open(netns: &Path) -> CniResult<Connections> {
        let in_netns = |e| {
            let mut err = CniError::from(e);
            err.msg = format!("CNI_NETNS {}: {}", netns.display(), err.msg);
            err
        };
        let refuse = |why: &str| {
            Err(CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_NETNS {}: {why}", netns.display()),
            ))
        };
        match classify_namespace_file(netns).map_err(in_netns)? {
            NamespaceFile::Other => {}
            // The node would get the pod's default route in place of its own, and
            // lose it on DEL.
            NamespaceFile::Own => {
                return refuse("this is the node's own network namespace, not a pod's")
            }
            NamespaceFile::NotANamespace => return refuse("this is not a network namespace"),
        }
        let ns = open_namespace(netns).map_err(in_netns)?;
        Ok(Connections {
            host: Netlink::current()?,
            pod: Netlink::in_namespace(netns)?,
            netns: ns,
        })
    }

    /// Removes what an earlier ADD of the same pod left (a retried ADD, or a stale
    /// sandbox of a pod with the same name), and refuses when the pod already has an
    /// interface of that name that is not ours.
    pub async fn clear_leftovers(&self, host_veth: &str, ifname: &str) -> CniResult<()> {
        if let Some(stale) = self.host.link_by_name(host_veth).await? {
            tracing::info!(link = host_veth, "removing leftover host veth");
            self.host.delete_link(&stale).await?;
        }
        if self.pod.link_by_name(ifname).await?.is_some() {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_IFNAME {ifname}: the container already has an interface of that name"),
            ));
        }
        Ok(())
    }

    /// Creates and configures the veth pair. On failure, deletes the pair (which takes
    /// its addresses and routes with it) before returning the error.
    pub async fn wire(&self, pod: &PodNetwork) -> CniResult<WiredLinks> {
        self.host
            .create_veth(
                &pod.host_veth,
                HOST_VETH_MAC,
                if pod.held { HELD_POD_GROUP } else { 0 },
                &pod.ifname,
                pod.pod_mac,
                self.netns.file(),
                pod.mtu,
            )
            .await?;
        let result = self.configure(pod).await;
        if result.is_err() {
            if let Ok(Some(link)) = self.host.link_by_name(&pod.host_veth).await {
                if let Err(e) = self.host.delete_link(&link).await {
                    tracing::warn!(error = %e, "undo: delete veth");
                }
            }
        }
        result
    }

    async fn configure(&self, pod: &PodNetwork) -> CniResult<WiredLinks> {
        let missing = |side: &str, name: &str| {
            CniError::new(
                Code::Io,
                format!("{side} interface {name} vanished right after creation"),
            )
        };
        let host = self
            .host
            .link_by_name(&pod.host_veth)
            .await?
            .ok_or_else(|| missing("host", &pod.host_veth))?;
        let pod_link = self
            .pod
            .link_by_name(&pod.ifname)
            .await?
            .ok_or_else(|| missing("pod", &pod.ifname))?;
        let has_v4 = pod.addresses.iter().any(IpAddr::is_ipv4);
        let has_v6 = pod.addresses.iter().any(IpAddr::is_ipv6);

        // Host end: sysctls before the link is up (accept_dad must be off before IPv6
        // starts on it), then up.
        for (key, value) in host_veth_sysctls(&pod.host_veth, has_v4, has_v6) {
            sysctl::set(&key, value)?;
        }
        self.host.set_up(&host).await?;

        // Pod end.
        if has_v6 {
            self.netns
                .run(|_| sysctl::set("net.ipv6.conf.all.disable_ipv6", "0"))
                .map_err(|e| {
                    CniError::new(Code::Io, format!("enter {}: {e}", pod.netns.display()))
                })??;
        }
        for ip in &pod.addresses {
            self.pod
                .add_address(&pod_link, *ip, host_prefix(*ip), ip.is_ipv6())
                .await?;
        }
        self.pod.set_up(&pod_link).await?;
        // Created, never replaced: the pod's routes are this interface's alone.
        for route in pod.pod_routes(pod_link.index) {
            self.pod.create_route(&route).await?;
        }
        for ip in &pod.addresses {
            self.pod
                .add_permanent_neighbour(&pod_link, gateway_for(*ip), HOST_VETH_MAC)
                .await?;
        }

        // The host's route to the pod.
        for route in pod.host_routes(host.index) {
            self.add_host_route(&route).await?;
        }
        Ok(WiredLinks {
            host,
            pod: pod_link,
        })
    }

    /// The host route to a pod address. One already there is replaced only when it is
    /// Calyx's own (left by an earlier pod of that address); anyone else's is an error.
    async fn add_host_route(&self, route: &RouteSpec) -> CniResult<()> {
        match self.host.create_route(route).await {
            Err(e) if e.is_exists() => {
                let ours = self
                    .host
                    .routes_of_protocol(route.destination.is_ipv4(), CALYX_ROUTE_PROTOCOL)
                    .await?
                    .iter()
                    .any(|r| {
                        r.destination == route.destination && r.prefix_len == route.prefix_len
                    });
                if !ours {
                    return Err(CniError::new(
                        Code::Io,
                        format!(
                            "host route {}/{} exists and was not made by Calyx; not replacing it",
                            route.destination, route.prefix_len
                        ),
                    ));
                }
                tracing::info!(route = %route.destination, "replacing a stale Calyx host route");
                Ok(self.host.add_route(route).await?)
            }
            other => Ok(other?),
        }
    }

    /// Whether the pod already has a default route of a family (from an earlier
    /// interface): the plan gives a new interface only the families it lacks.
    pub async fn pod_has_default_route(&self, ipv4: bool) -> CniResult<bool> {
        Ok(self
            .pod
            .routes(ipv4)
            .await?
            .iter()
            .any(|r| r.prefix_len == 0))
    }

    /// What CHECK compares: the pod interface, its addresses and routes, and the host
    /// veth with its routes.
    pub async fn observe(&self, host_veth: &str, ifname: &str) -> CniResult<Observed> {
        let mut observed = Observed::default();
        if let Some(pod) = self.pod.link_by_name(ifname).await? {
            observed.pod_addresses = self.pod.addresses(&pod).await?;
            for v4 in [true, false] {
                observed.pod_routes.extend(self.pod.routes(v4).await?);
            }
            observed.pod = Some(pod);
        }
        if let Some(host) = self.host.link_by_name(host_veth).await? {
            for v4 in [true, false] {
                observed.host_routes.extend(
                    self.host
                        .routes_via(&host, v4, CALYX_ROUTE_PROTOCOL)
                        .await?,
                );
            }
            observed.host = Some(host);
        }
        Ok(observed)
    }
}

/// Deletes the host veth of an attachment (its peer, addresses and routes go with
/// it), whether or not the pod's namespace still exists. A veth whose Calyx routes
/// lead to other addresses than `addresses` belongs to a newer pod of the same name
/// and is left alone.
pub async fn unwire(host_veth: &str, addresses: &[IpAddr]) -> CniResult<()> {
    let host = Netlink::current()?;
    let Some(link) = host.link_by_name(host_veth).await? else {
        return Ok(());
    };
    let mut routed = Vec::new();
    for v4 in [true, false] {
        routed.extend(host.routes_via(&link, v4, CALYX_ROUTE_PROTOCOL).await?);
    }
    if let Some(foreign) = routed.iter().find(|r| !addresses.contains(&r.destination)) {
        tracing::warn!(
            link = host_veth,
            route = %foreign.destination,
            "host veth now serves another address; leaving it"
        );
        return Ok(());
    }
    match host.delete_link(&link).await {
        Err(e) if e.is_not_found() => Ok(()),
        other => Ok(other?),
    }
}

pub fn mac_text(link: &Link) -> String {
    format_mac(&link.mac)
}
