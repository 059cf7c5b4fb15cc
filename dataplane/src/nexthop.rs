//! Nexthop objects (RTM_*NEXTHOP), which the netlink crates do not model. Routes to
//! thousands of remote blocks, each through its own VTEP, stay linear in the kernel
//! when they point at nexthop objects (`route <block> nhid N`); with a gateway each,
//! the kernel's cost grows quadratically (its fib_info hash ignores the gateway).
//!
//! Requests are built here by hand and sent through a `Batch`: many requests per
//! send, then their acknowledgements.

use std::io;
use std::net::IpAddr;

use netlink_sys::SocketAddr;

use crate::batch::{attr_header, error_code, messages_with_seq, u32_at, Batch, Request};
use crate::{DataplaneError, Result};

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const RTNH_F_ONLINK: u32 = 4;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// `nexthop id <id> via <gateway> dev <device> onlink proto <protocol>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Nexthop {
    pub id: u32,
    pub gateway: IpAddr,
    pub device: u32,
    pub protocol: u8,
}

pub struct NexthopSocket {
    batch: Batch,
}

fn io_err(op: &str, source: io::Error) -> DataplaneError {
    DataplaneError::Io {
        op: op.to_string(),
        source,
    }
}

impl NexthopSocket {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<NexthopSocket> {
        Ok(NexthopSocket {
            batch: Batch::open()?,
        })
    }

    /// Creates or replaces nexthops; returns the ones that failed, with why.
    pub fn replace(&mut self, nexthops: &[Nexthop]) -> Result<Vec<(String, io::Error)>> {
        let requests: Vec<Request> = nexthops
            .iter()
            .map(|nh| {
                let mut attrs = Vec::new();
                put_attr(&mut attrs, NHA_ID, &nh.id.to_ne_bytes());
                put_attr(&mut attrs, NHA_OIF, &nh.device.to_ne_bytes());
                match nh.gateway {
                    IpAddr::V4(v4) => put_attr(&mut attrs, NHA_GATEWAY, &v4.octets()),
                    IpAddr::V6(v6) => put_attr(&mut attrs, NHA_GATEWAY, &v6.octets()),
                }
                let family = if nh.gateway.is_ipv4() {
                    AF_INET
                } else {
                    AF_INET6
                };
                let header = nhmsg(family, nh.protocol, RTNH_F_ONLINK);
                let body = [header.as_slice(), attrs.as_slice()].concat();
                let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
                Request::raw(
                    format!("add nexthop {} via {}", nh.id, nh.gateway),
                    message(RTM_NEWNEXTHOP, flags, 0, &body),
                )
            })
            .collect();
        self.batch.send(requests)
    }

    /// Deletes nexthops by ID (the kernel removes the routes that use them too).
    pub fn delete(&mut self, ids: &[u32]) -> Result<Vec<(String, io::Error)>> {
        let requests = ids
            .iter()
            .map(|id| {
                let mut attrs = Vec::new();
                put_attr(&mut attrs, NHA_ID, &id.to_ne_bytes());
                let body = [nhmsg(0, 0, 0).as_slice(), attrs.as_slice()].concat();
                Request::raw(
                    format!("delete nexthop {id}"),
                    message(RTM_DELNEXTHOP, NLM_F_REQUEST | NLM_F_ACK, 0, &body),
                )
            })
            .collect();
        self.batch.send(requests)
    }

    /// Every nexthop object in the namespace.
    pub fn dump(&mut self) -> Result<Vec<Nexthop>> {
        let seq = self.batch.next_seq();
        let request = message(
            RTM_GETNEXTHOP,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            &nhmsg(0, 0, 0),
        );
        self.batch
            .socket
            .send_to(&request, &SocketAddr::new(0, 0), 0)
            .map_err(|e| io_err("dump nexthops", e))?;
        let mut out = Vec::new();
        loop {
            let (datagram, _) = self
                .batch
                .socket
                .recv_from_full()
                .map_err(|e| io_err("dump nexthops", e))?;
            for (kind, payload) in messages(&datagram) {
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = error_code(payload);
                        if code != 0 {
                            return Err(io_err(
                                "dump nexthops",
                                io::Error::from_raw_os_error(-code),
                            ));
                        }
                    }
                    RTM_NEWNEXTHOP => {
                        if let Some(nh) = parse_nexthop(payload) {
                            out.push(nh);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn nhmsg(family: u8, protocol: u8, flags: u32) -> Vec<u8> {
    let mut out = vec![family, 0, protocol, 0];
    out.extend(flags.to_ne_bytes());
    out
}

fn put_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend((len as u16).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(value);
    out.resize(out.len() + (4 - len % 4) % 4, 0);
}

fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = 16 + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend((len as u32).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(seq.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    out.extend(body);
    out
}

fn messages(datagram: &[u8]) -> Vec<(u16, &[u8])> {
    messages_with_seq(datagram)
        .into_iter()
        .map(|((k, _), p)| (k, p))
        .collect()
}

fn parse_nexthop(payload: &[u8]) -> Option<Nexthop> {
    let protocol = *payload.get(2)?;
    let (mut id, mut device, mut gateway) = (None, 0, None);
    let mut at = 8;
    while let Some((len, kind)) = attr_header(payload, at) {
        if len < 4 || at + len > payload.len() {
            break;
        }
        let value = &payload[at + 4..at + len];
        match kind & 0x3fff {
            NHA_ID => id = u32_at(value, 0),
            NHA_OIF => device = u32_at(value, 0).unwrap_or(0),
            NHA_GATEWAY => {
                gateway = match value.len() {
                    4 => <[u8; 4]>::try_from(value).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(value).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Some(Nexthop {
        id: id?,
        gateway: gateway?,
        device,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut out = Vec::new();
        put_attr(&mut out, NHA_GATEWAY, &[1, 2, 3, 4, 5]);
        assert_eq!(out.len(), 12);
        assert_eq!(attr_header(&out, 0), Some((9, NHA_GATEWAY)));
    }

    #[test]
    fn a_new_nexthop_message_parses_back() {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, NHA_ID, &42u32.to_ne_bytes());
        put_attr(&mut attrs, NHA_OIF, &7u32.to_ne_bytes());
        put_attr(&mut attrs, NHA_GATEWAY, &[10, 244, 1, 0]);
        let body = [nhmsg(AF_INET, 201, RTNH_F_ONLINK), attrs].concat();
        let datagram = message(RTM_NEWNEXTHOP, 0, 9, &body);
        let parsed = messages_with_seq(&datagram);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, (RTM_NEWNEXTHOP, 9));
        let nh = parse_nexthop(parsed[0].1).unwrap();
        assert_eq!(
            nh,
            Nexthop {
                id: 42,
                gateway: "10.244.1.0".parse().unwrap(),
                device: 7,
                protocol: 201
            }
        );
    }
}
