//! kube-ipvs0 and its addresses, and the node's own addresses NodePorts answer on:
//! the proxier's seam, so its tests run on a fake.

use std::collections::BTreeSet;
use std::net::IpAddr;

use calyx_dataplane::device_addresses::DeviceAddresses;
use calyx_dataplane::Result;

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

/// The kernel's kube-ipvs0, on the dataplane's one route-netlink socket.
impl Addresses for DeviceAddresses {
    fn held(&self) -> Result<Option<BTreeSet<IpAddr>>> {
        DeviceAddresses::held(self)
    }

    fn create_device(&self) -> Result<()> {
        self.create_dummy()
    }

    fn add(&self, ips: &[IpAddr]) -> Result<()> {
        DeviceAddresses::add(self, ips)
    }

    fn remove(&self, ips: &[IpAddr]) -> Result<()> {
        DeviceAddresses::remove(self, ips)
    }

    fn node_ips(&self, cidrs: &[ipnetwork::IpNetwork]) -> Result<Vec<IpAddr>> {
        DeviceAddresses::node_ips(self, cidrs)
    }

    fn remove_device(&self) -> Result<()> {
        DeviceAddresses::remove_device(self)
    }
}
