//! Set entries added and deleted straight over netlink (IPSET_CMD_ADD/DEL, as `ipset
//! restore -exist` sends them), without the `ipset` process. The process costs more
//! than the change at an endpoint change, and it resolves the protocol of every
//! `tcp:80` through /etc/protocols, a file read per entry. Sets are still created,
//! swapped and destroyed by `ipset restore`; `encode` says None for an entry it does not
//! know, and the caller leaves those to the tool too.
//!
//! Entries are in the form `ipset save` prints: `IP`, `PORT`, `IP,PROTO:PORT`,
//! `IP,PROTO:PORT,IP2[/CIDR]` (include/uapi/linux/netfilter/ipset/ip_set.h).

use std::net::IpAddr;

use super::FirewallError;
use crate::nl::{nfnetlink_message, Attrs, NlSocket, NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST};

const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_ADD: u16 = 9;
const IPSET_CMD_DEL: u16 = 10;
/// The oldest protocol the kernel takes (every kernel since 3.x does).
const IPSET_PROTOCOL: u8 = 6;

const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_PORT: u16 = 4;
const IPSET_ATTR_PROTO: u16 = 7;
const IPSET_ATTR_IP2: u16 = 20;
const IPSET_ATTR_CIDR2: u16 = 21;
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
const IPSET_ATTR_IPADDR_IPV6: u16 = 2;

const NLA_F_NET_BYTEORDER: u16 = 0x4000;

/// Requests per write before their acknowledgements are read (each takes buffer room).
const REQUESTS_PER_WRITE: usize = 128;

/// One entry added to or deleted from a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryOp<'a> {
    pub add: bool,
    pub set: &'a str,
    pub entry: &'a str,
}

impl std::fmt::Display for EntryOp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.add { "add" } else { "del" };
        write!(f, "{verb} {} {}", self.set, self.entry)
    }
}

fn put_ip(attrs: &mut Attrs, kind: u16, ip: IpAddr) {
    let nested = attrs.open(kind);
    match ip {
        IpAddr::V4(v4) => attrs.put(IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &v4.octets()),
        IpAddr::V6(v6) => attrs.put(IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, &v6.octets()),
    }
    attrs.close(nested);
}

fn put_port(attrs: &mut Attrs, text: &str) -> Option<()> {
    let port: u16 = text.parse().ok()?;
    attrs.put(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, &port.to_be_bytes());
    Some(())
}

/// The entry's data attributes; None for a form not known here.
fn data(entry: &str) -> Option<Vec<u8>> {
    let mut attrs = Attrs::new();
    let parts: Vec<&str> = entry.split(',').collect();
    match parts.as_slice() {
        [port] if port.bytes().all(|b| b.is_ascii_digit()) => put_port(&mut attrs, port)?,
        [ip] => put_ip(&mut attrs, IPSET_ATTR_IP, ip.parse().ok()?),
        [ip, proto_port, rest @ ..] if rest.len() <= 1 => {
            put_ip(&mut attrs, IPSET_ATTR_IP, ip.parse().ok()?);
            let (proto, port) = proto_port.split_once(':')?;
            let proto: u8 = match proto {
                "tcp" => 6,
                "udp" => 17,
                "sctp" => 132,
                _ => return None,
            };
            put_port(&mut attrs, port)?;
            attrs.put(IPSET_ATTR_PROTO, &[proto]);
            if let Some(second) = rest.first() {
                let (ip2, cidr) = match second.split_once('/') {
                    Some((ip2, cidr)) => (ip2, Some(cidr.parse::<u8>().ok()?)),
                    None => (*second, None),
                };
                put_ip(&mut attrs, IPSET_ATTR_IP2, ip2.parse().ok()?);
                if let Some(cidr) = cidr {
                    attrs.put(IPSET_ATTR_CIDR2, &[cidr]);
                }
            }
        }
        _ => return None,
    }
    Some(attrs.0)
}

/// The requests for `ops`, one message each (numbered when sent); None when an
/// entry's form is not known here.
pub fn encode(ops: &[EntryOp]) -> Option<Vec<Vec<u8>>> {
    ops.iter()
        .map(|op| {
            let mut attrs = Attrs::new();
            attrs.put(IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
            attrs.put_str(IPSET_ATTR_SETNAME, op.set);
            let nested = attrs.open(IPSET_ATTR_DATA);
            attrs.0.extend(data(op.entry)?);
            attrs.close(nested);
            let command = if op.add { IPSET_CMD_ADD } else { IPSET_CMD_DEL };
            // No NLM_F_EXCL: an entry already there (or already gone) is fine, as
            // with `ipset restore -exist`.
            Some(nfnetlink_message(
                (NFNL_SUBSYS_IPSET << 8) | command,
                NLM_F_REQUEST | NLM_F_ACK,
                0,
                0,
                0,
                &attrs.0,
            ))
        })
        .collect()
}

/// Sends the requests `encode` made for `ops`; a refusal names its entry (the first
/// one refused; the others were still written, which `-exist` semantics allow).
pub fn send(ops: &[EntryOp], requests: &[Vec<u8>]) -> Result<(), FirewallError> {
    let refused = |what: String, why: String| FirewallError::Refused {
        tool: "ipset netlink".into(),
        stderr: format!("{what}: {why}"),
    };
    let mut socket = NlSocket::open(NETLINK_NETFILTER, None)
        .map_err(|e| refused("socket".into(), e.to_string()))?;
    let failures = socket
        .send_all(requests, REQUESTS_PER_WRITE)
        .map_err(|e| refused("write".into(), e.to_string()))?;
    match failures.into_iter().next() {
        Some((i, error)) => {
            let what = ops
                .get(i)
                .map_or_else(|| "a request".to_string(), |op| op.to_string());
            Err(refused(what, explain(&error.to_string())))
        }
        None => Ok(()),
    }
}

/// ipset's own error numbers (above 4096) as its tool words them.
fn explain(why: &str) -> String {
    let code = why
        .rsplit(' ')
        .next()
        .and_then(|n| n.trim_end_matches(')').parse::<i32>().ok());
    let words = match code {
        Some(4097) => "kernel protocol not supported",
        Some(4098) => "set type not supported",
        Some(4102) => "the set is of another type",
        Some(4103) => "element exists / is missing",
        Some(4104) => "invalid CIDR",
        Some(4106) => "wrong address family",
        Some(4109) | Some(4110) => "invalid address",
        Some(4352) => "the set is full",
        Some(4354) => "invalid protocol",
        Some(4355) => "missing protocol",
        _ => return why.to_string(),
    };
    format!("{words} ({why})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_in_save_form_encode_and_unknown_forms_are_left_to_the_tool() {
        for entry in [
            "30080",
            "10.96.0.10",
            "fd00::10",
            "10.96.0.10,tcp:80",
            "10.244.1.2,udp:53,10.244.1.2",
            "198.51.100.1,tcp:80,192.0.2.0/24",
            "fd00::1,sctp:9,fd00::/64",
        ] {
            assert!(data(entry).is_some(), "{entry}");
        }
        for entry in [
            "10.96.0.10,icmp:ping",
            "10.0.0.1,tcp:80,a,b",
            "x",
            "10.0.0.1,80",
        ] {
            assert!(data(entry).is_none(), "{entry}");
        }
        // IP nested, in network order and flagged so; then port (network order) and
        // protocol.
        let d = data("10.96.0.10,tcp:80").unwrap();
        assert_eq!(
            d,
            [
                12, 0, 1, 0x80, 8, 0, 1, 0x40, 10, 96, 0, 10, // IP { IPV4 }
                6, 0, 4, 0x40, 0, 80, 0, 0, // PORT
                5, 0, 7, 0, 6, 0, 0, 0, // PROTO tcp
            ]
        );
        let ops = [EntryOp {
            add: true,
            set: "KUBE-CLUSTER-IP",
            entry: "10.96.0.10,tcp:80",
        }];
        let requests = encode(&ops).unwrap();
        assert_eq!(requests.len(), 1);
        // ipset ADD, acknowledged, without NLM_F_EXCL.
        assert_eq!(&requests[0][4..8], &[9, 6, 5, 0]);
        assert_eq!(
            explain("Unknown error 4102 (os error 4102)"),
            "the set is of another type (Unknown error 4102 (os error 4102))"
        );
    }
}
