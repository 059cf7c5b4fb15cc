//! Applies the overlay to the kernel: keeps `vxlan.calyx` as configured, reads what the
//! kernel has (FDB, neighbours, Calyx's routes on the device, blackholes) and applies
//! the difference computed in `desired`.

use std::net::IpAddr;

use calyx_dataplane::overlay::{VxlanLink, VxlanSpec};
use calyx_dataplane::{sysctl, Link, Netlink, RouteSpec, CALYX_ROUTE_PROTOCOL};
use ipnetwork::IpNetwork;

use calyx_dataplane::batch::{Batch, Request};
use calyx_dataplane::nexthop::{Nexthop, NexthopSocket};

use crate::overlay::desired::{nexthop_id, BlockRoute, OverlayChanges, OverlayState, VtepNexthop};
use crate::overlay::error::{OverlayError, Result};

/// The device as configured, plus the VTEP addresses it must hold.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub spec: VxlanSpec,
    pub vtep_ips: Vec<IpAddr>,
}

/// Makes `vxlan.calyx` exist with the right parameters, MTU, MAC, addresses and up.
/// A device whose VNI, port or local address differ is replaced; nothing else is ever
/// deleted, so a restarted agent leaves traffic alone.
pub async fn ensure_device(nl: &Netlink, config: &DeviceConfig) -> Result<(Link, bool)> {
    let spec = &config.spec;
    let mut changed = false;
    let existing = nl.vxlan_by_name(&spec.name).await?;
    if let Some(other) = existing.as_ref().filter(|v| !v.is_vxlan) {
        // Someone else's link (the underlay, once): never deleted or changed.
        return Err(OverlayError::Config(format!(
            "--vxlan-device {}: a link of that name exists and is not a VXLAN device (index {}); \
             leaving it alone: choose another name",
            spec.name, other.link.index
        )));
    }
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
            nl.link_by_name(&spec.name).await?.ok_or_else(|| {
                OverlayError::Kernel(format!("{} vanished right after creation", spec.name))
            })?
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
pub async fn actual_overlay(nl: &Netlink, device: &Link) -> Result<OverlayState> {
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

/// Sends one phase of requests as a batch, collecting failures ("not found" on a
/// removal is fine: it is gone already).
fn send_phase(batch: &mut Batch, phase: &str, requests: Vec<Request>, errors: &mut Vec<String>) {
    if requests.is_empty() {
        return;
    }
    let (count, started) = (requests.len(), std::time::Instant::now());
    match batch.send(requests) {
        Ok(failures) => {
            for (label, e) in failures {
                // ENOENT, ESRCH: a removal of what is gone already.
                if matches!(e.raw_os_error(), Some(2 | 3)) && phase.starts_with("remove") {
                    tracing::debug!(%label, "already gone");
                } else {
                    errors.push(format!("{label}: {e}"));
                }
            }
        }
        Err(e) => errors.push(format!("{phase}: {e}")),
    }
    tracing::debug!(
        phase,
        count,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "netlink batch done"
    );
}

/// Route requests, or the reason one cannot be built.
fn route_requests(
    routes: impl Iterator<Item = RouteSpec>,
    build: fn(&RouteSpec) -> calyx_dataplane::Result<Request>,
    errors: &mut Vec<String>,
) -> Vec<Request> {
    routes
        .filter_map(|route| build(&route).map_err(|e| errors.push(e.to_string())).ok())
        .collect()
}

/// Applies changes in an order that never leaves a route pointing at something
/// missing: routes and blackholes go first, then the nexthops they used, then
/// neighbour and FDB entries; FDB and neighbour entries come first, then nexthops,
/// then blackholes and routes. Each phase goes to the kernel as one batch. Carries on
/// past failures and returns them all.
pub fn apply(device: &Link, changes: &OverlayChanges) -> Vec<String> {
    let (add, remove) = (&changes.add, &changes.remove);
    let mut errors = Vec::new();
    let mut batch = match Batch::open() {
        Ok(batch) => batch,
        Err(e) => return vec![e.to_string()],
    };
    let dev = device.index;

    let routes = remove.routes.iter().map(|r| block_route(r, device));
    let blackholes = remove.blackholes.iter().map(blackhole);
    let requests = route_requests(routes.chain(blackholes), Request::delete_route, &mut errors);
    send_phase(&mut batch, "remove routes", requests, &mut errors);
    if !remove.nexthops.is_empty() {
        let ids: Vec<u32> = remove.nexthops.iter().map(|n| n.id).collect();
        let result = NexthopSocket::open().and_then(|mut s| s.delete(&ids));
        nexthop_failures(result, &mut errors);
    }
    let requests = (remove.neighbours.iter())
        .map(|n| Request::delete_neighbour(dev, n.ip))
        .chain(remove.fdb.iter().map(|f| Request::delete_fdb(dev, f)))
        .collect();
    send_phase(
        &mut batch,
        "remove neighbours and fdb",
        requests,
        &mut errors,
    );

    let requests = (add.fdb.iter())
        .map(|f| Request::replace_fdb(dev, f))
        .chain((add.neighbours.iter()).map(|n| Request::replace_neighbour(dev, n.ip, n.mac)))
        .collect();
    send_phase(&mut batch, "add fdb and neighbours", requests, &mut errors);
    if !add.nexthops.is_empty() {
        let nexthops: Vec<Nexthop> = add
            .nexthops
            .iter()
            .map(|n| Nexthop {
                id: n.id,
                gateway: n.via,
                device: dev,
                protocol: CALYX_ROUTE_PROTOCOL,
            })
            .collect();
        let result = NexthopSocket::open().and_then(|mut s| s.replace(&nexthops));
        nexthop_failures(result, &mut errors);
    }
    let blackholes = add.blackholes.iter().map(blackhole);
    let routes = add.routes.iter().map(|r| block_route(r, device));
    let requests = route_requests(
        blackholes.chain(routes),
        Request::replace_route,
        &mut errors,
    );
    send_phase(&mut batch, "add routes", requests, &mut errors);
    errors
}

fn nexthop_failures(
    result: calyx_dataplane::Result<Vec<(String, std::io::Error)>>,
    errors: &mut Vec<String>,
) {
    match result {
        Ok(failures) => {
            for (label, e) in failures {
                if e.raw_os_error() != Some(2) {
                    errors.push(format!("{label}: {e}"));
                }
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
}

/// `calyx-agent uninstall`: deletes the VXLAN device (its FDB, neighbour entries,
/// nexthops and routes go with it) and the node's blackhole block routes. Routes to
/// local pods (Calyx's protocol too, but through a pod's veth) stay: the pods do.
/// Returns what it removed.
pub async fn remove_overlay(nl: &Netlink, device: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Some(link) = nl.link_by_name(device).await? {
        nl.delete_link(&link).await?;
        removed.push(format!("device {device}"));
    }
    for v4 in [true, false] {
        for route in nl.routes_of_protocol(v4, CALYX_ROUTE_PROTOCOL).await? {
            if route.blackhole {
                nl.delete_route(&route).await?;
                removed.push(format!(
                    "blackhole {}/{}",
                    route.destination, route.prefix_len
                ));
            }
        }
    }
    Ok(removed)
}
