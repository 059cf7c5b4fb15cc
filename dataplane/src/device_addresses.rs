//! One device's addresses (kube-ipvs0 in IPVS mode) and the node's own, on one
//! route-netlink socket held for the owner's life: synchronous, so it needs no
//! runtime, and many addresses go in one write with their acknowledgements read back.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::sync::Mutex;

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::LinkDummy;

use crate::batch::{Batch, Request};
use crate::nl::Until;
use crate::{DataplaneError, Result};

/// ENODEV: the device is not there.
const NO_DEVICE: i32 = 19;

/// Addresses of the device named `device`, in the namespace it was opened in.
pub struct DeviceAddresses {
    device: String,
    socket: Mutex<Batch>,
}

fn netlink_err(op: String, source: io::Error) -> DataplaneError {
    DataplaneError::Netlink { op, source }
}

fn address_message(index: u32, ip: IpAddr, prefix_len: u8) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.index = index;
    message.header.prefix_len = prefix_len;
    message.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    message.attributes.push(AddressAttribute::Local(ip));
    message.attributes.push(AddressAttribute::Address(ip));
    message
}

/// A reply read back (its kind and payload, as `exchange` gives them).
fn parse(kind: u16, payload: &[u8]) -> Option<RouteNetlinkMessage> {
    let frame = crate::nl::message(kind, 0, 0, payload);
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&frame)
        .ok()?
        .payload
    {
        NetlinkPayload::InnerMessage(message) => Some(message),
        _ => None,
    }
}

impl DeviceAddresses {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open(device: &str) -> Result<DeviceAddresses> {
        Ok(DeviceAddresses {
            device: device.to_string(),
            socket: Mutex::new(Batch::open()?),
        })
    }

    fn with_socket<T>(&self, f: impl FnOnce(&mut Batch) -> Result<T>) -> Result<T> {
        let mut socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut socket)
    }

    /// The device's index; None when there is no such device.
    fn index(&self, batch: &mut Batch) -> Result<Option<u32>> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(self.device.clone()));
        let request = Request::of(String::new(), RouteNetlinkMessage::GetLink(message), 0);
        let (bytes, _) = batch.socket.stamp([request.frame()]);
        let mut index = None;
        let refusals = batch
            .socket
            .exchange(&bytes, Until::Acks(1), |reply| {
                if let Some(RouteNetlinkMessage::NewLink(link)) = parse(reply.kind, reply.payload) {
                    index = Some(link.header.index);
                }
            })
            .map_err(|e| netlink_err(format!("look up {}", self.device), e))?;
        match refusals.into_iter().next() {
            Some(r) if r.error.raw_os_error() == Some(NO_DEVICE) => Ok(None),
            Some(r) => Err(netlink_err(format!("look up {}", self.device), r.error)),
            None => Ok(index),
        }
    }

    /// Every address of every link: (link index, address).
    fn all_addresses(batch: &mut Batch) -> Result<Vec<(u32, IpAddr)>> {
        let request = Request::of(
            String::new(),
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        );
        let mut frame = request.frame().to_vec();
        // A dump is acknowledged by NLMSG_DONE, not an ack.
        let flags = NLM_F_REQUEST | NLM_F_DUMP;
        frame[6..8].copy_from_slice(&flags.to_ne_bytes());
        let replies = batch
            .socket
            .dump(&frame)
            .map_err(|e| netlink_err("list addresses".into(), e))?;
        let mut out = Vec::new();
        for (kind, payload) in replies {
            if let Some(RouteNetlinkMessage::NewAddress(a)) = parse(kind, &payload) {
                let ip = a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = ip.or_else(|| {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
                if let Some(ip) = ip {
                    out.push((a.header.index, ip));
                }
            }
        }
        Ok(out)
    }

    /// The device's addresses; None when there is no device.
    pub fn held(&self) -> Result<Option<BTreeSet<IpAddr>>> {
        self.with_socket(|batch| {
            let Some(index) = self.index(batch)? else {
                return Ok(None);
            };
            Ok(Some(
                DeviceAddresses::all_addresses(batch)?
                    .into_iter()
                    .filter(|(i, _)| *i == index)
                    .map(|(_, ip)| ip)
                    .collect(),
            ))
        })
    }

    /// Creates the device as a dummy link, left down (it only holds addresses).
    pub fn create_dummy(&self) -> Result<()> {
        self.with_socket(|batch| {
            let message = LinkDummy::new(&self.device).build();
            let request = Request::of(
                format!("create dummy link {}", self.device),
                RouteNetlinkMessage::NewLink(message),
                NLM_F_CREATE | NLM_F_EXCL,
            );
            batch.send_one(request)
        })
    }

    /// Deletes the device; one already gone is fine.
    pub fn remove_device(&self) -> Result<()> {
        self.with_socket(|batch| {
            let Some(index) = self.index(batch)? else {
                return Ok(());
            };
            let mut message = LinkMessage::default();
            message.header.index = index;
            let request = Request::of(
                format!("delete link {}", self.device),
                RouteNetlinkMessage::DelLink(message),
                0,
            );
            match batch.send_one(request) {
                Err(e) if e.is_not_found() => Ok(()),
                other => other,
            }
        })
    }

    /// Adds host addresses (/32, /128, no duplicate detection) to the device: all of
    /// them in one go; the first refused is named, the others are still added.
    pub fn add(&self, ips: &[IpAddr]) -> Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        self.with_socket(|batch| {
            let index = self.index(batch)?.ok_or_else(|| {
                netlink_err(
                    format!("add addresses to {}", self.device),
                    io::Error::from_raw_os_error(NO_DEVICE),
                )
            })?;
            let requests = ips
                .iter()
                .map(|ip| {
                    let mut message = address_message(index, *ip, crate::host_prefix(*ip));
                    message
                        .attributes
                        .push(AddressAttribute::Flags(AddressFlags::Nodad));
                    Request::of(
                        format!("add address {ip} to {}", self.device),
                        RouteNetlinkMessage::NewAddress(message),
                        NLM_F_CREATE | NLM_F_REPLACE,
                    )
                })
                .collect();
            match batch.send(requests)?.into_iter().next() {
                Some((op, source)) => Err(netlink_err(op, source)),
                None => Ok(()),
            }
        })
    }

    /// Removes addresses from the device; one already gone (or no device) is fine.
    pub fn remove(&self, ips: &[IpAddr]) -> Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        self.with_socket(|batch| {
            let Some(index) = self.index(batch)? else {
                return Ok(());
            };
            let requests = ips
                .iter()
                .map(|ip| {
                    Request::of(
                        format!("delete address {ip} from {}", self.device),
                        RouteNetlinkMessage::DelAddress(address_message(
                            index,
                            *ip,
                            crate::host_prefix(*ip),
                        )),
                        0,
                    )
                })
                .collect();
            for (op, source) in batch.send(requests)? {
                let error = netlink_err(op, source);
                if !error.is_not_found() {
                    return Err(error);
                }
            }
            Ok(())
        })
    }

    /// The node's addresses inside `cidrs`: not loopback, not IPv6 link-local, not
    /// the device's own. Sorted, without repeats.
    pub fn node_ips(&self, cidrs: &[ipnetwork::IpNetwork]) -> Result<Vec<IpAddr>> {
        self.with_socket(|batch| {
            let device = self.index(batch)?;
            let mut out: Vec<IpAddr> = DeviceAddresses::all_addresses(batch)?
                .into_iter()
                .filter(|(index, ip)| {
                    Some(*index) != device
                        && !ip.is_loopback()
                        && !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
                        && cidrs.iter().any(|c| c.contains(*ip))
                })
                .map(|(_, ip)| ip)
                .collect();
            out.sort();
            out.dedup();
            Ok(out)
        })
    }
}
