//! Applies the overlay to the kernel: keeps `vxlan.calyx` as configured, reads what the
//! kernel has (FDB, neighbours, Calyx's routes on the device, blackholes) and applies
//! the difference computed in `desired`.

use std::net::IpAddr;

use calyx_dataplane::overlay::{VxlanLink, VxlanSpec};
use calyx_dataplane::{sysctl, Link, Netlink, RouteSpec, CALYX_ROUTE_PROTOCOL};
use ipnetwork::IpNetwork;

use crate::desired::{BlockRoute, OverlayChanges, OverlayState};

/// The device as configured, plus the VTEP addresses it must hold.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub spec: VxlanSpec,
    pub vtep_ips: Vec<IpAddr>,
}

/// Makes `vxlan.calyx` exist with the right parameters, MTU, MAC, addresses and up.
/// A device whose VNI, port or local address differ is replaced; nothing else is ever
/// deleted, so a restarted agent leaves traffic alone.
pub async fn ensure_device(nl: &Netlink, config: &DeviceConfig) -> anyhow::Result<(Link, bool)> {
    let spec = &config.spec;
    let mut changed = false;
    let existing = nl.vxlan_by_name(&spec.name).await?;
    let link = match existing {
        Some(VxlanLink { ref link, .. }) if existing.as_ref().is_some_and(|v| v.matches(spec)) => {
            link.clone()
        }
        other => {
            if let Some(stale) = other {
                tracing::warn!(device = %spec.name, ?stale, "device differs from the configuration; recreating it");
                nl.delete_link(&stale.link).await?;
            }
            nl.create_vxlan(spec).await?;
            changed = true;
            nl.link_by_name(&spec.name)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{} vanished right after creation", spec.name))?
        }
    };
    if link.mtu != spec.mtu || link.mac != spec.mac {
        nl.set_mtu_and_mac(&link, spec.mtu, spec.mac).await?;
        changed = true;
    }
    let have = nl.addresses(&link).await?;
    for ip in &config.vtep_ips {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        if !have.contains(&(*ip, prefix)) {
            if ip.is_ipv6() {
                let key = sysctl::iface_key("net.ipv6.conf", &spec.name, "disable_ipv6");
                sysctl::set(&key, "0")?;
            }
            nl.add_address(&link, *ip, prefix, ip.is_ipv6()).await?;
            changed = true;
        }
    }
    if !link.up {
        nl.set_up(&link).await?;
        changed = true;
    }
    Ok((link, changed))
}

/// The overlay entries the kernel has on `device`, and Calyx's blackholes.
pub async fn actual_overlay(nl: &Netlink, device: &Link) -> anyhow::Result<OverlayState> {
    let mut state = OverlayState {
        fdb: nl.fdb_entries(device).await?.into_iter().collect(),
        neighbours: nl.permanent_neighbours(device).await?.into_iter().collect(),
        ..Default::default()
    };
    for v4 in [true, false] {
        for route in nl.routes_of_protocol(v4, CALYX_ROUTE_PROTOCOL).await? {
            let Ok(block) = IpNetwork::new(route.destination, route.prefix_len) else {
                continue;
            };
            if route.blackhole {
                state.blackholes.insert(block);
            } else if route.device == device.index {
                if let Some(via) = route.gateway {
                    state.routes.insert(BlockRoute { block, via });
                }
            }
        }
    }
    Ok(state)
}

fn block_route(route: &BlockRoute, device: &Link) -> RouteSpec {
    RouteSpec {
        gateway: Some(route.via),
        link_scope: false,
        onlink: true,
        ..RouteSpec::direct(
            route.block.network(),
            route.block.prefix(),
            device.index,
            CALYX_ROUTE_PROTOCOL,
        )
    }
}

fn blackhole(block: &IpNetwork) -> RouteSpec {
    RouteSpec {
        link_scope: false,
        blackhole: true,
        ..RouteSpec::direct(block.network(), block.prefix(), 0, CALYX_ROUTE_PROTOCOL)
    }
}

/// How many netlink requests are in flight at once while applying changes: enough to
/// hide the round trips, the kernel still handles them one by one.
const IN_FLIGHT: usize = 128;

/// Applies changes in phases: removals of routes first, then of neighbours and FDB
/// entries, then FDB and neighbour additions, then routes, so a route never points at
/// a VTEP that cannot be reached yet. Within a phase requests are pipelined. Carries
/// on past failures and returns them all.
pub async fn apply(nl: &Netlink, device: &Link, changes: &OverlayChanges) -> Vec<String> {
    use futures::future::BoxFuture;
    use futures::{FutureExt, StreamExt};
    type Op<'a> = BoxFuture<'a, calyx_dataplane::Result<()>>;

    let removals: Vec<Vec<Op>> = vec![
        changes
            .remove
            .routes
            .iter()
            .map(|r| nl.delete_route_owned(block_route(r, device)).boxed())
            .collect(),
        changes
            .remove
            .blackholes
            .iter()
            .map(|b| nl.delete_route_owned(blackhole(b)).boxed())
            .collect(),
        changes
            .remove
            .neighbours
            .iter()
            .map(|n| nl.delete_neighbour(device, n).boxed())
            .collect(),
        changes
            .remove
            .fdb
            .iter()
            .map(|f| nl.delete_fdb(device, f).boxed())
            .collect(),
    ];
    let additions: Vec<Vec<Op>> = vec![
        changes
            .add
            .fdb
            .iter()
            .map(|f| nl.add_fdb(device, f).boxed())
            .collect(),
        changes
            .add
            .neighbours
            .iter()
            .map(|n| nl.add_permanent_neighbour(device, n.ip, n.mac).boxed())
            .collect(),
        changes
            .add
            .blackholes
            .iter()
            .map(|b| nl.add_route_owned(blackhole(b)).boxed())
            .collect(),
        changes
            .add
            .routes
            .iter()
            .map(|r| nl.add_route_owned(block_route(r, device)).boxed())
            .collect(),
    ];
    let mut errors = Vec::new();
    for phase in removals.into_iter().chain(additions) {
        let results: Vec<_> = futures::stream::iter(phase)
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for result in results {
            match result {
                Ok(()) => {}
                Err(e) if e.is_not_found() => tracing::debug!(error = %e, "already gone"),
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    errors
}
