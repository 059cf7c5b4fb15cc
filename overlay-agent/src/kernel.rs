//! Applies the overlay to the kernel: keeps `vxlan.calyx` as configured, reads what the
//! kernel has (FDB, neighbours, Calyx's routes on the device, blackholes) and applies
//! the difference computed in `desired`.

use std::net::IpAddr;

use calyx_dataplane::overlay::{VxlanLink, VxlanSpec};
use calyx_dataplane::{sysctl, Link, Netlink, RouteSpec, CALYX_ROUTE_PROTOCOL};
use ipnetwork::IpNetwork;

use calyx_dataplane::nexthop::{Nexthop, NexthopSocket};

use crate::desired::{nexthop_id, BlockRoute, OverlayChanges, OverlayState, VtepNexthop};

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
    let mut nexthop_via = std::collections::HashMap::new();
    for nh in NexthopSocket::open()?.dump()? {
        if nh.protocol == CALYX_ROUTE_PROTOCOL && nh.device == device.index {
            nexthop_via.insert(nh.id, nh.gateway);
            state.nexthops.insert(VtepNexthop {
                id: nh.id,
                via: nh.gateway,
            });
        }
    }
    for v4 in [true, false] {
        for route in nl.routes_of_protocol(v4, CALYX_ROUTE_PROTOCOL).await? {
            let Ok(block) = IpNetwork::new(route.destination, route.prefix_len) else {
                continue;
            };
            if route.blackhole {
                state.blackholes.insert(block);
            } else if let Some(id) = route.nexthop_id {
                if let Some(via) = nexthop_via.get(&id) {
                    state.routes.insert(BlockRoute { block, via: *via });
                }
            } else if route.device == device.index {
                if let Some(via) = route.gateway {
                    state.routes.insert(BlockRoute { block, via });
                }
            }
        }
    }
    Ok(state)
}

/// IPv4 block routes go through the VTEP's nexthop object; IPv6 ones name the VTEP
/// as gateway.
fn block_route(route: &BlockRoute, device: &Link) -> RouteSpec {
    if let Some(id) = nexthop_id(route.via) {
        return RouteSpec {
            link_scope: false,
            nexthop_id: Some(id),
            ..RouteSpec::direct(
                route.block.network(),
                route.block.prefix(),
                0,
                CALYX_ROUTE_PROTOCOL,
            )
        };
    }
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

type Op<'a> = futures::future::BoxFuture<'a, calyx_dataplane::Result<()>>;

/// Runs one phase of requests pipelined, collecting failures ("not found" on a
/// removal is fine: it is gone already).
async fn pipelined(ops: Vec<Op<'_>>, errors: &mut Vec<String>) {
    use futures::StreamExt;
    let results: Vec<_> = futures::stream::iter(ops)
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

fn nexthop_failures(
    what: &str,
    result: calyx_dataplane::Result<Vec<(u32, std::io::Error)>>,
    errors: &mut Vec<String>,
) {
    match result {
        Ok(failures) => {
            for (id, e) in failures {
                if e.raw_os_error() != Some(2) {
                    errors.push(format!("{what} nexthop {id}: {e}"));
                }
            }
        }
        Err(e) => errors.push(format!("{what} nexthops: {e}")),
    }
}

/// Applies changes in an order that never leaves a route pointing at something
/// missing: routes and blackholes go first, then the nexthops they used, then
/// neighbour and FDB entries; FDB and neighbour entries come first, then nexthops,
/// then blackholes and routes. Within a phase requests are pipelined; nexthops go in
/// batches. Carries on past failures and returns them all.
pub async fn apply(nl: &Netlink, device: &Link, changes: &OverlayChanges) -> Vec<String> {
    use futures::FutureExt;
    let (add, remove) = (&changes.add, &changes.remove);
    let mut errors = Vec::new();

    let ops: Vec<Op> = remove
        .routes
        .iter()
        .map(|r| nl.delete_route_owned(block_route(r, device)).boxed())
        .collect();
    pipelined(ops, &mut errors).await;
    let ops: Vec<Op> = remove
        .blackholes
        .iter()
        .map(|b| nl.delete_route_owned(blackhole(b)).boxed())
        .collect();
    pipelined(ops, &mut errors).await;
    if !remove.nexthops.is_empty() {
        let ids: Vec<u32> = remove.nexthops.iter().map(|n| n.id).collect();
        let result = NexthopSocket::open().and_then(|mut s| s.delete(&ids));
        nexthop_failures("delete", result, &mut errors);
    }
    let ops: Vec<Op> = remove
        .neighbours
        .iter()
        .map(|n| nl.delete_neighbour(device, n).boxed())
        .collect();
    pipelined(ops, &mut errors).await;
    let ops: Vec<Op> = remove
        .fdb
        .iter()
        .map(|f| nl.delete_fdb(device, f).boxed())
        .collect();
    pipelined(ops, &mut errors).await;

    let ops: Vec<Op> = add
        .fdb
        .iter()
        .map(|f| nl.add_fdb(device, f).boxed())
        .collect();
    pipelined(ops, &mut errors).await;
    let ops: Vec<Op> = add
        .neighbours
        .iter()
        .map(|n| nl.add_permanent_neighbour(device, n.ip, n.mac).boxed())
        .collect();
    pipelined(ops, &mut errors).await;
    if !add.nexthops.is_empty() {
        let nexthops: Vec<Nexthop> = add
            .nexthops
            .iter()
            .map(|n| Nexthop {
                id: n.id,
                gateway: n.via,
                device: device.index,
                protocol: CALYX_ROUTE_PROTOCOL,
            })
            .collect();
        let result = NexthopSocket::open().and_then(|mut s| s.replace(&nexthops));
        nexthop_failures("add", result, &mut errors);
    }
    let ops: Vec<Op> = add
        .blackholes
        .iter()
        .map(|b| nl.add_route_owned(blackhole(b)).boxed())
        .collect();
    pipelined(ops, &mut errors).await;
    let ops: Vec<Op> = add
        .routes
        .iter()
        .map(|r| nl.add_route_owned(block_route(r, device)).boxed())
        .collect();
    pipelined(ops, &mut errors).await;
    errors
}
