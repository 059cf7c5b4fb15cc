//! Many rtnetlink requests per send on one synchronous socket, then their
//! acknowledgements: what `ip -batch` does. For thousands of FDB, neighbour, nexthop
//! and route entries this is 3-5x faster than one request at a time through the
//! async connection (measured in `make bench-agent`'s 10,000-node sync).

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::netlink::{route_message, RouteSpec};
use crate::overlay::FdbEntry;
use crate::{DataplaneError, Result};

const NLMSG_ERROR: u16 = 2;
/// Requests per send: their acknowledgements must fit the socket's receive buffer.
const PER_SEND: usize = 256;

/// One request: a label for errors and the complete message (sequence number unset).
pub struct Request {
    pub label: String,
    frame: Vec<u8>,
}

impl Request {
    /// A hand-built message (nexthops, which the netlink crates do not model).
    pub(crate) fn raw(label: String, frame: Vec<u8>) -> Request {
        Request { label, frame }
    }

    fn of(label: String, message: RouteNetlinkMessage, flags: u16) -> Request {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut frame = vec![0; packet.buffer_len()];
        packet.serialize(&mut frame);
        Request { label, frame }
    }

    /// `route replace <route>`.
    pub fn replace_route(route: &RouteSpec) -> Result<Request> {
        Ok(Request::of(
            format!("add route {}", crate::netlink::describe_route(route)),
            RouteNetlinkMessage::NewRoute(route_message(route)?),
            NLM_F_CREATE | NLM_F_REPLACE,
        ))
    }

    pub fn delete_route(route: &RouteSpec) -> Result<Request> {
        Ok(Request::of(
            format!("delete route {}", crate::netlink::describe_route(route)),
            RouteNetlinkMessage::DelRoute(route_message(route)?),
            0,
        ))
    }

    /// `neigh replace <ip> lladdr <mac> dev <index> nud permanent`.
    pub fn replace_neighbour(device: u32, ip: IpAddr, mac: [u8; 6]) -> Request {
        let mut message = neighbour(device, ip);
        message.header.state = NeighbourState::Permanent;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        Request::of(
            format!("add neighbour {ip} lladdr {}", crate::format_mac(&mac)),
            RouteNetlinkMessage::NewNeighbour(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    pub fn delete_neighbour(device: u32, ip: IpAddr) -> Request {
        Request::of(
            format!("delete neighbour {ip}"),
            RouteNetlinkMessage::DelNeighbour(neighbour(device, ip)),
            0,
        )
    }

    /// `bridge fdb replace <mac> dev <index> dst <ip> self permanent`.
    pub fn replace_fdb(device: u32, entry: &FdbEntry) -> Request {
        let mut message = fdb(device, entry);
        message.header.state = NeighbourState::Permanent;
        Request::of(
            format!(
                "add fdb {} dst {}",
                crate::format_mac(&entry.mac),
                entry.dst
            ),
            RouteNetlinkMessage::NewNeighbour(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    pub fn delete_fdb(device: u32, entry: &FdbEntry) -> Request {
        Request::of(
            format!(
                "delete fdb {} dst {}",
                crate::format_mac(&entry.mac),
                entry.dst
            ),
            RouteNetlinkMessage::DelNeighbour(fdb(device, entry)),
            0,
        )
    }
}

fn neighbour(device: u32, ip: IpAddr) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    message.header.ifindex = device;
    message
        .attributes
        .push(NeighbourAttribute::Destination(neighbour_address(ip)));
    message
}

fn fdb(device: u32, entry: &FdbEntry) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = device;
    message.header.flags = NeighbourFlags::Own;
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(entry.mac.to_vec()));
    message
        .attributes
        .push(NeighbourAttribute::Destination(neighbour_address(
            entry.dst,
        )));
    message
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// A route-netlink socket in the calling thread's network namespace.
pub struct Batch {
    pub(crate) socket: Socket,
    seq: u32,
}

fn io_err(op: &str, source: io::Error) -> DataplaneError {
    DataplaneError::Io {
        op: op.to_string(),
        source,
    }
}

impl Batch {
    pub fn open() -> Result<Batch> {
        let mut socket =
            Socket::new(NETLINK_ROUTE).map_err(|e| io_err("open netlink socket", e))?;
        socket
            .bind_auto()
            .map_err(|e| io_err("bind netlink socket", e))?;
        Ok(Batch { socket, seq: 1 })
    }

    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends every request and waits for all acknowledgements. Returns the requests
    /// the kernel refused, with why; only the socket itself failing is an error.
    pub fn send(&mut self, requests: Vec<Request>) -> Result<Vec<(String, io::Error)>> {
        let mut failures = Vec::new();
        for chunk in requests.chunks(PER_SEND) {
            let mut buffer = Vec::new();
            let mut pending = std::collections::HashMap::new();
            for request in chunk {
                let seq = self.next_seq();
                pending.insert(seq, request.label.as_str());
                let start = buffer.len();
                buffer.extend(&request.frame);
                buffer[start + 8..start + 12].copy_from_slice(&seq.to_ne_bytes());
            }
            self.socket
                .send_to(&buffer, &SocketAddr::new(0, 0), 0)
                .map_err(|e| io_err("send netlink requests", e))?;
            while !pending.is_empty() {
                let (datagram, _) = self
                    .socket
                    .recv_from_full()
                    .map_err(|e| io_err("read netlink acknowledgements", e))?;
                for ((kind, seq), payload) in messages_with_seq(&datagram) {
                    if kind != NLMSG_ERROR {
                        continue;
                    }
                    if let Some(label) = pending.remove(&seq) {
                        let code = error_code(payload);
                        if code != 0 {
                            failures.push((label.to_string(), io::Error::from_raw_os_error(-code)));
                        }
                    }
                }
            }
        }
        Ok(failures)
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn attr_header(b: &[u8], at: usize) -> Option<(usize, u16)> {
    Some((u16_at(b, at)? as usize, u16_at(b, at + 2)?))
}

/// ((type, seq), payload) of each netlink message in a datagram.
pub(crate) fn messages_with_seq(datagram: &[u8]) -> Vec<((u16, u32), &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind), Some(seq)) = (
        u32_at(datagram, at),
        u16_at(datagram, at + 4),
        u32_at(datagram, at + 8),
    ) {
        let len = len as usize;
        if len < 16 || at + len > datagram.len() {
            break;
        }
        out.push(((kind, seq), &datagram[at + 16..at + len]));
        at += (len + 3) & !3;
    }
    out
}

pub(crate) fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_one_complete_netlink_message_with_ack() {
        let request = Request::replace_neighbour(7, "10.244.1.0".parse().unwrap(), [2; 6]);
        let frame = &request.frame;
        assert_eq!(u32_at(frame, 0), Some(frame.len() as u32));
        assert_eq!(u16_at(frame, 4), Some(28), "RTM_NEWNEIGH");
        let flags = u16_at(frame, 6).unwrap();
        assert_eq!(
            flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(messages_with_seq(frame).len(), 1);
    }
}
