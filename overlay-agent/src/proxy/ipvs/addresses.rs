//! kube-ipvs0 and its addresses, and the node's own addresses NodePorts answer on.

use std::collections::BTreeSet;
use std::net::IpAddr;

use calyx_dataplane::{DataplaneError, Result};
use futures::StreamExt;

use super::DUMMY;

pub trait Addresses: Send + Sync {
    /// kube-ipvs0's addresses; None when there is no kube-ipvs0.
    fn held(&self) -> Result<Option<BTreeSet<IpAddr>>>;
    fn create_device(&self) -> Result<()>;
    /// Adds addresses to kube-ipvs0 (all of them: one that fails is named, the others
    /// are still added).
    fn add(&self, ips: &[IpAddr]) -> Result<()>;
    /// Removes addresses from kube-ipvs0; one already gone is fine.
    fn remove(&self, ips: &[IpAddr]) -> Result<()>;
    /// The node's addresses inside `cidrs` (not loopback, not IPv6 link-local, not
    /// kube-ipvs0's).
    fn node_ips(&self, cidrs: &[ipnetwork::IpNetwork]) -> Result<Vec<IpAddr>>;
    fn remove_device(&self) -> Result<()>;
}

/// The kernel's links, through the dataplane's netlink handle.
pub struct KernelAddresses;

/// Address requests sent before waiting for their answers.
const ADDRESS_REQUESTS_IN_FLIGHT: usize = 64;

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => tokio::task::block_in_place(|| handle.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f),
    }
}

pub(super) fn host_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

impl Addresses for KernelAddresses {
    fn held(&self) -> Result<Option<BTreeSet<IpAddr>>> {
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            let Some(link) = nl.link_by_name(DUMMY).await? else {
                return Ok(None);
            };
            Ok(Some(
                nl.addresses(&link)
                    .await?
                    .into_iter()
                    .map(|(ip, _)| ip)
                    .collect(),
            ))
        })
    }

    fn create_device(&self) -> Result<()> {
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            nl.create_dummy(DUMMY).await?;
            Ok(())
        })
    }

    fn add(&self, ips: &[IpAddr]) -> Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            let link = nl
                .link_by_name(DUMMY)
                .await?
                .ok_or_else(|| DataplaneError::Netlink {
                    op: format!("add addresses to {DUMMY}"),
                    source: std::io::Error::from_raw_os_error(19), // ENODEV
                })?;
            // One connection, many requests in flight: one at a time, each address
            // costs a round trip.
            let results: Vec<_> = futures::stream::iter(ips)
                .map(|ip| nl.add_address(&link, *ip, host_prefix(ip), true))
                .buffer_unordered(ADDRESS_REQUESTS_IN_FLIGHT)
                .collect()
                .await;
            results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))?;
            Ok(())
        })
    }

    fn remove(&self, ips: &[IpAddr]) -> Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            let Some(link) = nl.link_by_name(DUMMY).await? else {
                return Ok(());
            };
            let results: Vec<_> = futures::stream::iter(ips)
                .map(|ip| nl.delete_address(&link, *ip, host_prefix(ip)))
                .buffer_unordered(ADDRESS_REQUESTS_IN_FLIGHT)
                .collect()
                .await;
            for result in results {
                if let Err(e) = result {
                    if !e.is_not_found() {
                        return Err(e);
                    }
                }
            }
            Ok(())
        })
    }

    fn node_ips(&self, cidrs: &[ipnetwork::IpNetwork]) -> Result<Vec<IpAddr>> {
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            let dummy = nl.link_by_name(DUMMY).await?.map(|l| l.index);
            let mut out: Vec<IpAddr> = nl
                .all_addresses()
                .await?
                .into_iter()
                .filter(|(index, ip, _)| {
                    Some(*index) != dummy
                        && !ip.is_loopback()
                        && !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
                        && cidrs.iter().any(|c| c.contains(*ip))
                })
                .map(|(_, ip, _)| ip)
                .collect();
            out.sort();
            out.dedup();
            Ok(out)
        })
    }

    fn remove_device(&self) -> Result<()> {
        block_on(async {
            let nl = calyx_dataplane::Netlink::current()?;
            if let Some(link) = nl.link_by_name(DUMMY).await? {
                nl.delete_link(&link).await?;
            }
            Ok(())
        })
    }
}
