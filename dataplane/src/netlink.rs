//! Typed netlink calls over one rtnetlink connection, bound to one network namespace.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::{DataplaneError, Result};

/// Routes Calyx installs carry this protocol number, so they can be told apart from
/// everyone else's (`ip route show proto 201`).
pub const CALYX_ROUTE_PROTOCOL: u8 = 201;

/// The parts of a link Calyx cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    /// The link's group (`ip link set group`); 0 is the default group.
    pub group: u32,
}

/// A route, as Calyx writes and compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub device: u32,
    /// Link scope (a directly attached host or gateway) rather than universe.
    pub link_scope: bool,
    pub protocol: u8,
    /// The gateway is on the link even though no address of ours says so (VTEPs).
    pub onlink: bool,
    /// Drop traffic (a node's own blocks: addresses not given out go nowhere).
    pub blackhole: bool,
    /// Through a nexthop object (`nhid N`) instead of gateway and device.
    pub nexthop_id: Option<u32>,
}

impl RouteSpec {
    /// `dst dev <device> scope link`.
    pub fn direct(destination: IpAddr, prefix_len: u8, device: u32, protocol: u8) -> RouteSpec {
        RouteSpec {
            destination,
            prefix_len,
            gateway: None,
            device,
            link_scope: true,
            protocol,
            onlink: false,
            blackhole: false,
            nexthop_id: None,
        }
    }
}

/// What a route dump asks the kernel for.
struct RouteFilter {
    ipv4: bool,
    protocol: Option<u8>,
    device: Option<u32>,
    blackholes_too: bool,
}

/// How a link is looked up.
pub(crate) enum LinkKey<'a> {
    Name(&'a str),
    Index(u32),
}

/// A netlink connection bound to one network namespace.
pub struct Netlink {
    pub(crate) handle: Handle,
}

pub(crate) fn nl_err(op: impl Into<String>, err: rtnetlink::Error) -> DataplaneError {
    let source = match err {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => std::io::Error::other(other.to_string()),
    };
    DataplaneError::Netlink {
        op: op.into(),
        source,
    }
}

impl Netlink {
    /// A connection in the calling thread's current namespace. Needs a tokio runtime.
    pub fn current() -> Result<Netlink> {
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(|source| DataplaneError::Io {
                op: "open netlink socket".into(),
                source,
            })?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// A connection inside the namespace at `path`: enters it only long enough to open
    /// the socket (a netlink socket stays bound to the namespace it was opened in), then
    /// returns. Run it on a current-thread runtime: setns acts on the calling thread.
    pub fn in_namespace(path: &Path) -> Result<Netlink> {
        let ns = open_namespace(path)?;
        let opened = ns
            .run(|_| rtnetlink::new_connection_with_strict_check())
            .map_err(|e| netns_err(path, e.to_string(), false))?;
        let (connection, handle, _) = opened.map_err(|source| DataplaneError::Io {
            op: format!("open netlink socket in {}", path.display()),
            source,
        })?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The link message for a name or an index; None when there is no such link.
    pub(crate) async fn link_message(&self, key: LinkKey<'_>) -> Result<Option<LinkMessage>> {
        let request = self.handle.link().get();
        let (mut links, what) = match key {
            LinkKey::Name(name) => (
                request.match_name(name.to_string()).execute(),
                name.to_string(),
            ),
            LinkKey::Index(index) => (request.match_index(index).execute(), format!("#{index}")),
        };
        match links.try_next().await {
            Ok(found) => Ok(found),
            Err(e) => {
                let err = nl_err(format!("get link {what}"), e);
                if err.is_not_found() {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let msg = self.link_message(LinkKey::Name(name)).await?;
        Ok(msg.as_ref().map(link_from_message))
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let msg = self.link_message(LinkKey::Index(index)).await?;
        Ok(msg.as_ref().map(link_from_message))
    }

    /// Every address on every link: (link index, address, prefix length).
    pub async fn all_addresses(&self) -> Result<Vec<(u32, IpAddr, u8)>> {
        let mut stream = self.handle.address().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| nl_err("list addresses", e))?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    out.push((msg.header.index, *ip, msg.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Creates a veth pair whose peer is created directly inside the namespace open at
    /// `peer_netns` (one request; no move afterwards); the host end is in `host_group`
    /// from its first moment.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_veth(
        &self,
        host_name: &str,
        host_mac: [u8; 6],
        host_group: u32,
        peer_name: &str,
        peer_mac: [u8; 6],
        peer_netns: &std::fs::File,
        mtu: u32,
    ) -> Result<()> {
        let peer = rtnetlink::LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_string())
            .address(peer_mac.to_vec())
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let message = LinkVeth::new(host_name, peer_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .address(host_mac.to_vec())
            .mtu(mtu)
            .link_group(host_group)
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| {
                nl_err(
                    format!("create veth {host_name} (peer {peer_name}, mtu {mtu})"),
                    e,
                )
            })
    }

    pub async fn set_up(&self, link: &Link) -> Result<()> {
        let message = LinkUnspec::new_with_index(link.index).up().build();
        self.set_link(message, || format!("set link {} up", link.name))
            .await
    }

    /// Every link in `group`.
    pub async fn links_in_group(&self, group: u32) -> Result<Vec<Link>> {
        let mut stream = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| nl_err("list links", e))?
        {
            let link = link_from_message(&msg);
            if link.group == group {
                out.push(link);
            }
        }
        Ok(out)
    }

    pub async fn set_group(&self, link: &Link, group: u32) -> Result<()> {
        let message = LinkUnspec::new_with_index(link.index)
            .link_group(group)
            .build();
        self.set_link(message, || format!("set link {} group {group}", link.name))
            .await
    }

    /// Changes a link as `message` says; `op` names the change in an error.
    pub(crate) async fn set_link(
        &self,
        message: LinkMessage,
        op: impl FnOnce() -> String,
    ) -> Result<()> {
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|e| nl_err(op(), e))
    }

    pub async fn delete_link(&self, link: &Link) -> Result<()> {
        self.handle
            .link()
            .del(link.index)
            .execute()
            .await
            .map_err(|e| nl_err(format!("delete link {}", link.name), e))
    }

    /// Adds an address; `no_dad` marks IPv6 addresses usable at once (no duplicate
    /// address detection: the address is ours by allocation).
    pub async fn add_address(
        &self,
        link: &Link,
        ip: IpAddr,
        prefix_len: u8,
        no_dad: bool,
    ) -> Result<()> {
        let mut request = self
            .handle
            .address()
            .add(link.index, ip, prefix_len)
            .replace();
        if no_dad {
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request
            .execute()
            .await
            .map_err(|e| nl_err(format!("add address {ip}/{prefix_len} to {}", link.name), e))
    }

    pub async fn addresses(&self, link: &Link) -> Result<Vec<(IpAddr, u8)>> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| nl_err(format!("list addresses of {}", link.name), e))?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    let link_local =
                        matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
                    if !link_local {
                        out.push((*ip, msg.header.prefix_len));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Adds a route, replacing one to the same destination (the agent's routes, which
    /// it owns by protocol).
    pub async fn add_route(&self, route: &RouteSpec) -> Result<()> {
        let message = route_message(route)?;
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err(format!("add route {}", describe_route(route)), e))
    }

    /// Adds a route only if none to that destination exists (EEXIST otherwise): for
    /// places where a route already there belongs to someone else.
    pub async fn create_route(&self, route: &RouteSpec) -> Result<()> {
        let message = route_message(route)?;
        self.handle
            .route()
            .add(message)
            .execute()
            .await
            .map_err(|e| nl_err(format!("create route {}", describe_route(route)), e))
    }

    pub async fn delete_route(&self, route: &RouteSpec) -> Result<()> {
        let message = route_message(route)?;
        self.handle
            .route()
            .del(message)
            .execute()
            .await
            .map_err(|e| nl_err(format!("delete route {}", describe_route(route)), e))
    }

    /// Main-table routes of one family and protocol (any device, blackholes too).
    pub async fn routes_of_protocol(&self, ipv4: bool, protocol: u8) -> Result<Vec<RouteSpec>> {
        let filter = RouteFilter {
            ipv4,
            protocol: Some(protocol),
            device: None,
            blackholes_too: true,
        };
        self.dump_routes(&filter, "list routes").await
    }

    /// Main-table unicast routes of one family.
    pub async fn routes(&self, ipv4: bool) -> Result<Vec<RouteSpec>> {
        let filter = RouteFilter {
            ipv4,
            protocol: None,
            device: None,
            blackholes_too: false,
        };
        self.dump_routes(&filter, "list routes").await
    }

    /// Main-table unicast routes of one family and protocol whose output device is
    /// `link`, filtered by the kernel, so it stays cheap on a node with many routes.
    pub async fn routes_via(
        &self,
        link: &Link,
        ipv4: bool,
        protocol: u8,
    ) -> Result<Vec<RouteSpec>> {
        let filter = RouteFilter {
            ipv4,
            protocol: Some(protocol),
            device: Some(link.index),
            blackholes_too: false,
        };
        self.dump_routes(&filter, &format!("list routes via {}", link.name))
            .await
    }

    /// One strict dump of the main table: the kernel filters on what the request
    /// header and attributes say, and the result is checked again here for kernels
    /// that ignore a filter.
    async fn dump_routes(&self, filter: &RouteFilter, op: &str) -> Result<Vec<RouteSpec>> {
        let mut request = if filter.ipv4 {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        };
        let main_table = request.header.table;
        // A strict dump filters on a non-zero protocol; Unspec asks for every one.
        request.header.protocol = RouteProtocol::from(filter.protocol.unwrap_or(0));
        if filter.blackholes_too {
            // Unspec type: unicast and blackhole routes alike.
            request.header.kind = netlink_packet_route::route::RouteType::Unspec;
        }
        if let Some(index) = filter.device {
            request.attributes.push(RouteAttribute::Oif(index));
        }
        let mut stream = self.handle.route().get(request).execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(|e| nl_err(op, e))? {
            if msg.header.table != main_table {
                continue;
            }
            let Some(route) = route_from_message(&msg, filter.ipv4) else {
                continue;
            };
            let protocol_ok = filter.protocol.is_none_or(|p| route.protocol == p);
            let device_ok = filter.device.is_none_or(|d| route.device == d);
            if protocol_ok && device_ok {
                out.push(route);
            }
        }
        Ok(out)
    }

    /// A permanent neighbour entry (ip -> mac) on a link.
    pub async fn add_permanent_neighbour(
        &self,
        link: &Link,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<()> {
        self.handle
            .neighbours()
            .add(link.index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                let mac = crate::format_mac(&mac);
                nl_err(
                    format!("add neighbour {ip} lladdr {mac} dev {}", link.name),
                    e,
                )
            })
    }
}

/// Opens the namespace file at `path`, telling "not there" apart from other failures.
pub fn open_namespace(path: &Path) -> Result<netns_rs::NetNs> {
    netns_rs::get_from_path(path).map_err(|e| {
        let not_found = matches!(&e, netns_rs::Error::OpenNsError(_, io) if io.kind() == std::io::ErrorKind::NotFound);
        netns_err(path, e.to_string(), not_found)
    })
}

/// What a file that should be a pod's network namespace is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamespaceFile {
    /// A namespace other than the caller's: what a pod's should be.
    Other,
    /// The calling thread's own network namespace (the node's, for the plugin).
    Own,
    /// Not a namespace file at all (a plain file, a directory).
    NotANamespace,
}

/// Tells what `path` is, by its (device, inode): every namespace file lives on the one
/// nsfs filesystem, so a file on another device is no namespace.
pub fn classify_namespace_file(path: &Path) -> Result<NamespaceFile> {
    use std::os::unix::fs::MetadataExt;
    let identity = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| netns_err(p, e.to_string(), e.kind() == std::io::ErrorKind::NotFound))
    };
    let (dev, ino) = identity(path)?;
    let (own_dev, own_ino) = identity(Path::new("/proc/thread-self/ns/net"))?;
    Ok(if dev != own_dev {
        NamespaceFile::NotANamespace
    } else if ino == own_ino {
        NamespaceFile::Own
    } else {
        NamespaceFile::Other
    })
}

fn netns_err(path: &Path, reason: String, not_found: bool) -> DataplaneError {
    DataplaneError::Netns {
        path: path.display().to_string(),
        reason,
        not_found,
    }
}

pub(crate) fn link_from_message(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        group: 0,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Address(mac) => link.mac = mac.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Group(group) => link.group = *group,
            _ => {}
        }
    }
    link
}

pub(crate) fn route_message(route: &RouteSpec) -> Result<RouteMessage> {
    let invalid = |e: Box<dyn std::error::Error>| DataplaneError::Io {
        op: format!("build route {}", describe_route(route)),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
    };
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.destination, route.prefix_len)
        .map_err(|e| invalid(Box::new(e)))?
        .output_interface(route.device)
        .protocol(RouteProtocol::from(route.protocol))
        .scope(if route.link_scope {
            RouteScope::Link
        } else {
            RouteScope::Universe
        });
    if let Some(gateway) = route.gateway {
        builder = builder.gateway(gateway).map_err(|e| invalid(Box::new(e)))?;
    }
    let mut message = builder.build();
    if route.onlink {
        message.header.flags |= netlink_packet_route::route::RouteFlags::Onlink;
    }
    if route.blackhole {
        message.header.kind = netlink_packet_route::route::RouteType::BlackHole;
        message
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
    }
    if let Some(id) = route.nexthop_id {
        // The nexthop object carries gateway, device and onlink.
        message
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Oif(_) | RouteAttribute::Gateway(_)));
        message.header.flags -= netlink_packet_route::route::RouteFlags::Onlink;
        message.attributes.push(RouteAttribute::NhId(id));
    }
    Ok(message)
}

pub(crate) fn route_from_message(msg: &RouteMessage, ipv4: bool) -> Option<RouteSpec> {
    let family_ok = matches!(
        (msg.header.address_family, ipv4),
        (AddressFamily::Inet, true) | (AddressFamily::Inet6, false)
    );
    if !family_ok {
        return None;
    }
    let unspecified = if ipv4 {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    };
    let mut route = RouteSpec {
        destination: unspecified,
        prefix_len: msg.header.destination_prefix_length,
        gateway: None,
        device: 0,
        link_scope: msg.header.scope == RouteScope::Link,
        protocol: u8::from(msg.header.protocol),
        onlink: msg
            .header
            .flags
            .contains(netlink_packet_route::route::RouteFlags::Onlink),
        blackhole: msg.header.kind == netlink_packet_route::route::RouteType::BlackHole,
        nexthop_id: None,
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(addr) => route.destination = route_address(addr)?,
            RouteAttribute::Gateway(addr) => route.gateway = route_address(addr),
            RouteAttribute::Oif(index) => route.device = *index,
            RouteAttribute::NhId(id) => route.nexthop_id = Some(*id),
            _ => {}
        }
    }
    Some(route)
}

fn route_address(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

pub(crate) fn describe_route(route: &RouteSpec) -> String {
    let mut text = format!("{}/{}", route.destination, route.prefix_len);
    if route.blackhole {
        return format!("blackhole {text}");
    }
    if let Some(gw) = route.gateway {
        text.push_str(&format!(" via {gw}"));
    }
    text.push_str(&format!(" dev #{}", route.device));
    if route.onlink {
        text.push_str(" onlink");
    }
    if let Some(id) = route.nexthop_id {
        text = format!("{}/{} nhid {id}", route.destination, route.prefix_len);
    }
    text
}
