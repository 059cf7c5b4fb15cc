//! Nexthop objects (RTM_*NEXTHOP), which the netlink crates do not model. Routes to
//! thousands of remote blocks, each through its own VTEP, stay linear in the kernel
//! when they point at nexthop objects (`route <block> nhid N`); with a gateway each,
//! the kernel's cost grows quadratically (its fib_info hash ignores the gateway).
//!
//! Requests are built here by hand and sent through a `Batch`: many requests per
//! send, then their acknowledgements.

use std::io;
use std::net::IpAddr;

use crate::batch::{Batch, Request};
use crate::nl::{self, Attrs, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST};
use crate::{DataplaneError, Result};

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
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
                let mut attrs = Attrs::new();
                attrs.put_u32(NHA_ID, nh.id);
                attrs.put_u32(NHA_OIF, nh.device);
                match nh.gateway {
                    IpAddr::V4(v4) => attrs.put(NHA_GATEWAY, &v4.octets()),
                    IpAddr::V6(v6) => attrs.put(NHA_GATEWAY, &v6.octets()),
                }
                let family = if nh.gateway.is_ipv4() {
                    AF_INET
                } else {
                    AF_INET6
                };
                let header = nhmsg(family, nh.protocol, RTNH_F_ONLINK);
                let body = [header.as_slice(), attrs.0.as_slice()].concat();
                let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
                Request::raw(
                    format!("add nexthop {} via {}", nh.id, nh.gateway),
                    nl::message(RTM_NEWNEXTHOP, flags, 0, &body),
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
                let mut attrs = Attrs::new();
                attrs.put_u32(NHA_ID, *id);
                let body = [nhmsg(0, 0, 0).as_slice(), attrs.0.as_slice()].concat();
                Request::raw(
                    format!("delete nexthop {id}"),
                    nl::message(RTM_DELNEXTHOP, NLM_F_REQUEST | NLM_F_ACK, 0, &body),
                )
            })
            .collect();
        self.batch.send(requests)
    }

    /// Every nexthop object in the namespace.
    pub fn dump(&mut self) -> Result<Vec<Nexthop>> {
        let request = nl::message(
            RTM_GETNEXTHOP,
            NLM_F_REQUEST | NLM_F_DUMP,
            0,
            &nhmsg(0, 0, 0),
        );
        let replies = self
            .batch
            .socket
            .dump(&request)
            .map_err(|e| io_err("dump nexthops", e))?;
        Ok(replies
            .iter()
            .filter(|(kind, _)| *kind == RTM_NEWNEXTHOP)
            .filter_map(|(_, payload)| parse_nexthop(payload))
            .collect())
    }
}

fn nhmsg(family: u8, protocol: u8, flags: u32) -> Vec<u8> {
    let mut out = vec![family, 0, protocol, 0];
    out.extend(flags.to_ne_bytes());
    out
}

fn parse_nexthop(payload: &[u8]) -> Option<Nexthop> {
    let protocol = *payload.get(2)?;
    let (mut id, mut device, mut gateway) = (None, 0, None);
    let u32_of = |v: &[u8]| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?));
    for (kind, value) in nl::attributes(payload.get(8..)?) {
        match kind {
            NHA_ID => id = u32_of(value),
            NHA_OIF => device = u32_of(value).unwrap_or(0),
            NHA_GATEWAY => {
                gateway = match value.len() {
                    4 => <[u8; 4]>::try_from(value).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(value).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            _ => {}
        }
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
    fn a_new_nexthop_message_parses_back() {
        let mut attrs = Attrs::new();
        attrs.put_u32(NHA_ID, 42);
        attrs.put_u32(NHA_OIF, 7);
        attrs.put(NHA_GATEWAY, &[10, 244, 1, 0]);
        let body = [nhmsg(AF_INET, 201, RTNH_F_ONLINK), attrs.0].concat();
        let datagram = nl::message(RTM_NEWNEXTHOP, 0, 9, &body);
        let parsed = nl::messages(&datagram);
        assert_eq!(parsed.len(), 1);
        assert_eq!((parsed[0].kind, parsed[0].seq), (RTM_NEWNEXTHOP, 9));
        let nh = parse_nexthop(parsed[0].payload).unwrap();
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
