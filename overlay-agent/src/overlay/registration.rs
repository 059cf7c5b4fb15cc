//! Joining the cluster: find the underlay, get tunnel addresses from this node's
//! block, register the node, and leave the node name and MTU for the CNI plugin.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use calyx_dataplane::{Link, Netlink};
use calyx_ipam::allocator::AllocationRequest;
use calyx_ipam::model::{tunnel_handle_id, AllocationAttrs, NodeRecord};
use calyx_ipam::store::StoreError;
use calyx_ipam::{unix_now, Ipam, IpamError};

use super::error::{OverlayError, Result};
use sha1::{Digest, Sha1};

#[derive(Debug, Clone)]
pub struct Underlay {
    pub link: Link,
    pub ip: IpAddr,
}

/// VXLAN overhead: outer IPv4 (20) or IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub fn vxlan_overhead(underlay: IpAddr) -> u32 {
    if underlay.is_ipv4() {
        50
    } else {
        70
    }
}

fn is_global(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The underlay: the interface holding `ip`, or the first address of `interface`, or
/// else the interface and source address of the default route.
pub async fn detect_underlay(
    nl: &Netlink,
    interface: Option<&str>,
    ip: Option<IpAddr>,
) -> Result<Underlay> {
    let addresses = nl.all_addresses().await?;
    let first_address_of = |index: u32| {
        let global = addresses
            .iter()
            .filter(|(i, a, _)| *i == index && is_global(a));
        global
            .clone()
            .find(|(_, a, _)| a.is_ipv4())
            .or_else(|| global.clone().next())
            .map(|(_, a, _)| *a)
    };
    if let Some(ip) = ip {
        let Some((index, _, _)) = addresses.iter().find(|(_, a, _)| *a == ip) else {
            return Err(OverlayError::Config(format!(
                "--underlay-ip {ip}: no interface on this node has that address"
            )));
        };
        let link = nl
            .link_by_index(*index)
            .await?
            .ok_or_else(|| OverlayError::Kernel("underlay link vanished".into()))?;
        return Ok(Underlay { link, ip });
    }
    if let Some(name) = interface {
        let link = nl.link_by_name(name).await?.ok_or_else(|| {
            OverlayError::Config(format!("--underlay-interface {name}: no such interface"))
        })?;
        let ip = first_address_of(link.index).ok_or_else(|| {
            OverlayError::Config(format!(
                "--underlay-interface {name}: it has no global address"
            ))
        })?;
        return Ok(Underlay { link, ip });
    }
    for v4 in [true, false] {
        let default = nl
            .routes(v4)
            .await?
            .into_iter()
            .find(|r| r.prefix_len == 0 && r.device != 0);
        if let Some(route) = default {
            let link = nl
                .link_by_index(route.device)
                .await?
                .ok_or_else(|| OverlayError::Kernel("default route's link vanished".into()))?;
            if let Some(ip) = first_address_of(link.index) {
                return Ok(Underlay { link, ip });
            }
        }
    }
    Err(OverlayError::Config("cannot detect the underlay: no default route with a source address; pass --underlay-interface or --underlay-ip".into()))
}

/// A stable, locally administered unicast MAC for this node's VTEP, derived from its
/// name so that it survives restarts (and a lost datastore).
pub fn vtep_mac(node: &str) -> [u8; 6] {
    let digest = Sha1::digest(format!("calyx-vtep:{node}").as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] | 0x02) & 0xfe;
    mac
}

/// The VXLAN tunnel addresses of this node: one per pool family, from the node's own
/// block (claiming the first block when the node has none). Waits for pools to exist.
pub async fn tunnel_addresses(ipam: &Ipam<'_>, node: &str) -> Result<Vec<IpAddr>> {
    let request = AllocationRequest {
        handle_id: tunnel_handle_id(node),
        network: "calyx-agent".into(),
        attrs: AllocationAttrs {
            node: node.to_string(),
            time: unix_now(),
            ..Default::default()
        },
        host_interface: None,
        pool_filter: vec![],
    };
    let (handle, _) =
        retry_while_waiting("allocate the tunnel addresses", || ipam.allocate(&request)).await?;
    Ok(handle.addresses.iter().map(|a| a.ip).collect())
}

/// Runs a startup step again (backing off up to 5 s) while the datastore is
/// unavailable or has no pool yet, so the agent behaves the same with or without
/// flags that write to it; any other error ends the start.
pub async fn retry_while_waiting<T, F, Fut>(what: &str, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, IpamError>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match step().await {
            Ok(done) => return Ok(done),
            Err(IpamError::NoPools) => {
                tracing::warn!("{what}: no address pool in the datastore yet (pass --pool or add one with ipamctl); waiting");
            }
            Err(IpamError::Store(e @ StoreError::Unavailable { .. })) => {
                tracing::warn!(error = %e, retry_in = ?delay, "{what}: datastore unavailable; retrying");
            }
            Err(source) => {
                return Err(OverlayError::Step {
                    what: what.to_string(),
                    source,
                })
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Writes or updates this node's record, bumping the heartbeat. Returns the record.
pub async fn register(ipam: &Ipam<'_>, record: NodeRecord) -> Result<NodeRecord> {
    Ok(ipam.register_node(record).await?)
}

pub fn describe(record: &NodeRecord) -> String {
    format!(
        "{} underlay {} vtep {:?}/{:?} mac {}",
        record.name, record.underlay_ip, record.vtep_ipv4, record.vtep_ipv6, record.vtep_mac
    )
}

/// Leaves `nodename` and `mtu` for the CNI plugin (written whole, then renamed).
pub fn write_state_files(dir: &Path, node: &str, pod_mtu: u32) -> Result<()> {
    let file = |what: String| move |source| OverlayError::File { what, source };
    std::fs::create_dir_all(dir).map_err(file(format!("create {}", dir.display())))?;
    for (name, value) in [("nodename", node.to_string()), ("mtu", pod_mtu.to_string())] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, format!("{value}\n"))
            .map_err(file(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(file(format!("write {}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_stable_unicast_and_locally_administered() {
        let mac = vtep_mac("node-1");
        assert_eq!(mac, vtep_mac("node-1"));
        assert_ne!(mac, vtep_mac("node-2"));
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn overhead_depends_on_the_underlay_family() {
        assert_eq!(vxlan_overhead("192.0.2.1".parse().unwrap()), 50);
        assert_eq!(vxlan_overhead("2001:db8::1".parse().unwrap()), 70);
    }
}
