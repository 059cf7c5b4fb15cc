//! Netlink calls of the overlay: the VXLAN device, its FDB and neighbour entries, and
//! the stream of kernel events the agent reacts to.

use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkUnspec, LinkVxlan, MulticastGroup};
use tokio::sync::mpsc;

use crate::netlink::{link_from_message, nl_err, LinkKey};
use crate::{DataplaneError, Link, Netlink, Result};

/// What a VXLAN device is configured with; compared to decide whether to recreate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: IpAddr,
    pub underlay_index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A VXLAN device as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanLink {
    pub link: Link,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    pub learning: Option<bool>,
    /// The link is a VXLAN device at all (a link of that name may be anything).
    pub is_vxlan: bool,
}

impl VxlanLink {
    /// Whether the parameters that need a new device (VNI, port, local address,
    /// learning) match; MTU and MAC can be changed in place.
    pub fn matches(&self, spec: &VxlanSpec) -> bool {
        self.vni == Some(spec.vni)
            && self.port == Some(spec.port)
            && self.local == Some(spec.local)
            && self.learning == Some(false)
    }
}

/// An FDB entry of the VXLAN device: frames for `mac` go to `dst` over the underlay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub dst: IpAddr,
}

/// A permanent neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// Something changed in the kernel's links, neighbours or routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Link {
        index: u32,
        deleted: bool,
    },
    Neighbour {
        index: u32,
        deleted: bool,
    },
    Route {
        deleted: bool,
        protocol: u8,
        /// Destination and prefix length, when the message has one.
        destination: Option<(IpAddr, u8)>,
    },
}

impl Netlink {
    pub async fn vxlan_by_name(&self, name: &str) -> Result<Option<VxlanLink>> {
        let Some(msg) = self.link_message(LinkKey::Name(name)).await? else {
            return Ok(None);
        };
        let mut out = VxlanLink {
            link: link_from_message(&msg),
            vni: None,
            port: None,
            local: None,
            learning: None,
            is_vxlan: false,
        };
        for attr in &msg.attributes {
            let LinkAttribute::LinkInfo(infos) = attr else {
                continue;
            };
            for info in infos {
                if matches!(info, LinkInfo::Kind(InfoKind::Vxlan)) {
                    out.is_vxlan = true;
                }
                let LinkInfo::Data(InfoData::Vxlan(opts)) = info else {
                    continue;
                };
                for opt in opts {
                    match opt {
                        InfoVxlan::Id(id) => out.vni = Some(*id),
                        InfoVxlan::Port(port) => out.port = Some(*port),
                        InfoVxlan::Local(ip) => out.local = Some(IpAddr::V4(*ip)),
                        InfoVxlan::Local6(ip) => out.local = Some(IpAddr::V6(*ip)),
                        InfoVxlan::Learning(on) => out.learning = Some(*on),
                        _ => {}
                    }
                }
            }
        }
        Ok(Some(out))
    }

    pub async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<()> {
        let mut builder = LinkVxlan::new(&spec.name, spec.vni)
            .port(spec.port)
            .dev(spec.underlay_index)
            .learning(false)
            .address(spec.mac.to_vec())
            .mtu(spec.mtu);
        builder = match spec.local {
            IpAddr::V4(v4) => builder.local(v4),
            IpAddr::V6(v6) => builder.local6(v6),
        };
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(|e| {
                nl_err(
                    format!(
                        "create vxlan {} (vni {}, port {}, local {}, mtu {})",
                        spec.name, spec.vni, spec.port, spec.local, spec.mtu
                    ),
                    e,
                )
            })
    }

    pub async fn set_mtu_and_mac(&self, link: &Link, mtu: u32, mac: [u8; 6]) -> Result<()> {
        let message = LinkUnspec::new_with_index(link.index)
            .mtu(mtu)
            .address(mac.to_vec())
            .build();
        self.set_link(message, || format!("set mtu {mtu} on {}", link.name))
            .await
    }

    /// Permanent neighbour entries on a link, both families.
    pub async fn permanent_neighbours(&self, link: &Link) -> Result<Vec<Neighbour>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            // A strict dump takes the device as NDA_IFINDEX; the header's must be 0.
            let mut request = self.handle.neighbours().get().set_address_family(family);
            request
                .message_mut()
                .attributes
                .push(NeighbourAttribute::IfIndex(link.index));
            let mut stream = request.execute();
            while let Some(msg) = stream
                .try_next()
                .await
                .map_err(|e| nl_err(format!("list neighbours of {}", link.name), e))?
            {
                if msg.header.ifindex != link.index || msg.header.state != NeighbourState::Permanent
                {
                    continue;
                }
                if let (Some(ip), Some(mac)) = (neighbour_ip(&msg), neighbour_mac(&msg)) {
                    out.push(Neighbour { ip, mac });
                }
            }
        }
        Ok(out)
    }

    /// FDB entries of a VXLAN device that send a MAC to a remote underlay address.
    pub async fn fdb_entries(&self, link: &Link) -> Result<Vec<FdbEntry>> {
        let mut request = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge);
        request.message_mut().header.ifindex = link.index;
        let mut stream = request.execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| nl_err(format!("list fdb of {}", link.name), e))?
        {
            if msg.header.ifindex != link.index {
                continue;
            }
            if let (Some(dst), Some(mac)) = (neighbour_ip(&msg), neighbour_mac(&msg)) {
                out.push(FdbEntry { mac, dst });
            }
        }
        Ok(out)
    }
}

/// Subscribes to link, neighbour and route changes; events arrive on the receiver
/// until it is dropped. Needs a tokio runtime.
pub fn monitor() -> Result<mpsc::UnboundedReceiver<KernelEvent>> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ];
    let subscribe_error = |source| DataplaneError::Io {
        op: "subscribe to netlink events".into(),
        source,
    };
    let (mut connection, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&groups).map_err(subscribe_error)?;
    use netlink_sys::AsyncSocket;
    // Room for the burst of events a big sync of our own causes (four entries per
    // node), so that other changes in it are not dropped (ENOBUFS). The
    // kernel caps it at net.core.rmem_max; whatever is dropped, the resync repairs.
    connection
        .socket_mut()
        .socket_mut()
        .set_rx_buf_sz(8 << 20)
        .map_err(subscribe_error)?;
    tokio::spawn(connection);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            use netlink_packet_core::NetlinkPayload;
            let NetlinkPayload::InnerMessage(inner) = message.payload else {
                continue;
            };
            let event = match inner {
                RouteNetlinkMessage::NewLink(m) => KernelEvent::Link {
                    index: m.header.index,
                    deleted: false,
                },
                RouteNetlinkMessage::DelLink(m) => KernelEvent::Link {
                    index: m.header.index,
                    deleted: true,
                },
                RouteNetlinkMessage::NewNeighbour(m) => KernelEvent::Neighbour {
                    index: m.header.ifindex,
                    deleted: false,
                },
                RouteNetlinkMessage::DelNeighbour(m) => KernelEvent::Neighbour {
                    index: m.header.ifindex,
                    deleted: true,
                },
                RouteNetlinkMessage::NewRoute(m) => route_event(&m, false),
                RouteNetlinkMessage::DelRoute(m) => route_event(&m, true),
                _ => continue,
            };
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn route_event(m: &netlink_packet_route::route::RouteMessage, deleted: bool) -> KernelEvent {
    use netlink_packet_route::route::{RouteAddress, RouteAttribute};
    let destination = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    });
    KernelEvent::Route {
        deleted,
        protocol: u8::from(m.header.protocol),
        destination: destination.map(|ip| (ip, m.header.destination_prefix_length)),
    }
}

/// NDA_DST as an IP. In AF_BRIDGE (FDB) messages the parser cannot know the address
/// family and leaves raw bytes: 4 or 16 of them are an IPv4 or IPv6 address.
fn neighbour_ip(msg: &NeighbourMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => match raw.len() {
            4 => <[u8; 4]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    })
}

fn neighbour_mac(msg: &NeighbourMessage) -> Option<[u8; 6]> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok(),
        _ => None,
    })
}
