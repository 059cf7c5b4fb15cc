//! Set and map elements written straight over netlink (NFT_MSG_DELSETELEM and
//! NFT_MSG_NEWSETELEM in one nfnetlink batch, all or nothing like `nft -f`), for
//! transactions that only add and delete elements: what an endpoint change is. It saves
//! the `nft` process and its cache of the table, which grows with the table; what
//! remains is the kernel's commit of the change, whatever the set's size.
//! A transaction with anything else in it, or an element of a type not known here (an
//! interval set, say), is left to `nft -f`: `encode` says None.

use std::net::IpAddr;

use super::{Op, SetKind, Table, Transaction};
use crate::firewall::FirewallError;
use crate::nl::{
    nfnetlink_message, Attrs, NlSocket, Until, NETLINK_NETFILTER, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_REQUEST,
};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// Larger transactions (a start, a resync) go to `nft -f`, which batches them well.
const MAX_ELEMENTS: usize = 512;

/// One component of a key or value, as the kernel stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Ipv4,
    Ipv6,
    /// inet_proto: one byte.
    Proto,
    /// inet_service: two bytes, network order.
    Service,
    /// A 32-bit integer in host order (`numgen`, `mark`).
    HostU32,
    Verdict,
}

impl Field {
    fn from_type(name: &str) -> Option<Field> {
        Some(match name {
            "ipv4_addr" => Field::Ipv4,
            "ipv6_addr" => Field::Ipv6,
            "inet_proto" => Field::Proto,
            "inet_service" => Field::Service,
            "mark" => Field::HostU32,
            "verdict" => Field::Verdict,
            _ => return None,
        })
    }

    /// A `typeof` expression.
    fn from_expression(expr: &str) -> Option<Field> {
        let words: Vec<&str> = expr.split_whitespace().collect();
        Some(match words.as_slice() {
            ["ip", "saddr" | "daddr"] => Field::Ipv4,
            ["ip6", "saddr" | "daddr"] => Field::Ipv6,
            ["meta", "l4proto"] => Field::Proto,
            ["th" | "tcp" | "udp" | "sctp", "sport" | "dport"] => Field::Service,
            ["numgen", ..] | ["meta", "mark"] => Field::HostU32,
            _ => return None,
        })
    }

    fn encode(self, text: &str, out: &mut Vec<u8>) -> Option<()> {
        match self {
            Field::Ipv4 | Field::Ipv6 => match (self, text.parse::<IpAddr>().ok()?) {
                (Field::Ipv4, IpAddr::V4(a)) => out.extend(a.octets()),
                (Field::Ipv6, IpAddr::V6(a)) => out.extend(a.octets()),
                _ => return None,
            },
            Field::Proto => out.push(match text {
                "tcp" => 6,
                "udp" => 17,
                "sctp" => 132,
                other => other.parse().ok()?,
            }),
            Field::Service => out.extend(text.parse::<u16>().ok()?.to_be_bytes()),
            Field::HostU32 => out.extend(text.parse::<u32>().ok()?.to_ne_bytes()),
            Field::Verdict => return None,
        }
        Some(())
    }
}

/// A set's key and (for a map) value layout, from its declaration; None for what this
/// module does not write (intervals, timeouts, unknown types).
fn layout(declaration: &str) -> Option<(Vec<Field>, Option<Vec<Field>>)> {
    let (typed, rest) = declaration.split_once(';')?;
    if rest.contains("flags") {
        return None;
    }
    let (by_type, body) = if let Some(body) = typed.trim().strip_prefix("typeof ") {
        (false, body)
    } else {
        (true, typed.trim().strip_prefix("type ")?)
    };
    let fields = |part: &str| -> Option<Vec<Field>> {
        part.split(" . ")
            .map(|f| {
                if by_type {
                    Field::from_type(f.trim())
                } else {
                    Field::from_expression(f.trim())
                }
            })
            .collect()
    };
    match body.split_once(" : ") {
        Some((key, value)) => {
            let value = if value.trim() == "verdict" {
                vec![Field::Verdict]
            } else {
                fields(value)?
            };
            Some((fields(key)?, Some(value)))
        }
        None => Some((fields(body)?, None)),
    }
}

/// Key or data bytes: each field padded to four bytes when there are several (the
/// kernel's concatenation layout), a lone field as it is.
fn concatenation(fields: &[Field], text: &str) -> Option<Vec<u8>> {
    let parts: Vec<&str> = text.split(" . ").collect();
    if parts.len() != fields.len() {
        return None;
    }
    let mut out = Vec::new();
    for (field, part) in fields.iter().zip(parts) {
        field.encode(part.trim(), &mut out)?;
        if fields.len() > 1 {
            out.resize(out.len().div_ceil(4) * 4, 0);
        }
    }
    Some(out)
}

fn verdict(text: &str) -> Option<(i32, Option<&str>)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    Some(match words.as_slice() {
        ["drop"] => (0, None),
        ["accept"] => (1, None),
        ["continue"] => (-1, None),
        ["jump", chain] => (-3, Some(*chain)),
        ["goto", chain] => (-4, Some(*chain)),
        ["return"] => (-5, None),
        _ => return None,
    })
}

/// A set's name and its elements (key, map value) as one message carries them.
type SetElements<'a> = (&'a String, Vec<(&'a String, Option<&'a String>)>);

/// A ready nfnetlink batch of element changes: its messages (BEGIN, the changes,
/// END) and how many of them ask for an acknowledgement.
pub struct ElementBatch {
    messages: Vec<Vec<u8>>,
    acks: usize,
}

/// The batch for `tx`, or None when it must go to `nft -f` (see the module's comment).
/// `table` is the table as wanted: it gives each set's declaration.
pub fn encode(tx: &Transaction, table: &Table) -> Option<ElementBatch> {
    let mut count = 0;
    for op in &tx.ops {
        count += match op {
            Op::AddElements(_, e) => e.len(),
            Op::DeleteElements(_, k) => k.len(),
            _ => return None,
        };
    }
    if count == 0 || count > MAX_ELEMENTS {
        return None;
    }
    let family = tx.family.number();
    let mut messages = vec![nfnetlink_message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        0,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    )];
    let mut acks = 0;
    for op in &tx.ops {
        let ((name, elements), kind, flags): (SetElements, u16, u16) = match op {
            Op::AddElements(name, e) => (
                (name, e.iter().map(|(k, v)| (k, v.as_ref())).collect()),
                NFT_MSG_NEWSETELEM,
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
            ),
            Op::DeleteElements(name, k) => (
                (name, k.iter().map(|k| (k, None)).collect()),
                NFT_MSG_DELSETELEM,
                NLM_F_REQUEST | NLM_F_ACK,
            ),
            _ => return None,
        };
        let set = table.sets.get(name)?;
        let (key_fields, value_fields) = layout(&set.declaration)?;
        if (set.kind == SetKind::Map) != value_fields.is_some() {
            return None;
        }
        let mut attrs = Attrs::new();
        attrs.put_str(NFTA_SET_ELEM_LIST_TABLE, &tx.table);
        attrs.put_str(NFTA_SET_ELEM_LIST_SET, name);
        let list = attrs.open(NFTA_SET_ELEM_LIST_ELEMENTS);
        for (key, value) in elements {
            let element = attrs.open(NFTA_LIST_ELEM);
            let k = attrs.open(NFTA_SET_ELEM_KEY);
            attrs.put(NFTA_DATA_VALUE, &concatenation(&key_fields, key)?);
            attrs.close(k);
            // A map's new element carries its value; deletes name the key alone.
            if let (NFT_MSG_NEWSETELEM, Some(fields)) = (kind, &value_fields) {
                let value = value?;
                let d = attrs.open(NFTA_SET_ELEM_DATA);
                if fields.as_slice() == [Field::Verdict] {
                    let (code, chain) = verdict(value)?;
                    let v = attrs.open(NFTA_DATA_VERDICT);
                    attrs.put(NFTA_VERDICT_CODE, &code.to_be_bytes());
                    if let Some(chain) = chain {
                        attrs.put_str(NFTA_VERDICT_CHAIN, chain);
                    }
                    attrs.close(v);
                } else {
                    attrs.put(NFTA_DATA_VALUE, &concatenation(fields, value)?);
                }
                attrs.close(d);
            }
            attrs.close(element);
        }
        attrs.close(list);
        acks += 1;
        messages.push(nfnetlink_message(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            flags,
            0,
            family,
            0,
            &attrs.0,
        ));
    }
    messages.push(nfnetlink_message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        0,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    ));
    Some(ElementBatch { messages, acks })
}

/// Sends the batch on a fresh netfilter socket and waits for every acknowledgement;
/// the first error the kernel reports fails it (and the kernel has then applied none
/// of it).
pub fn send(batch: &ElementBatch, what: &str) -> Result<(), FirewallError> {
    let refused = |why: String| FirewallError::Refused {
        tool: "nftables netlink".into(),
        stderr: format!("{what}: {why}"),
    };
    let mut socket =
        NlSocket::open(NETLINK_NETFILTER, None).map_err(|e| refused(format!("socket: {e}")))?;
    let (bytes, _) = socket.stamp(batch.messages.iter().map(Vec::as_slice));
    let refusals = socket
        .exchange(&bytes, Until::AcksOrRefusal(batch.acks), |_| {})
        .map_err(|e| refused(e.to_string()))?;
    match refusals.into_iter().next() {
        Some(refusal) => Err(refused(refusal.error.to_string())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::nft::Set;
    use crate::firewall::IpFamily;

    #[test]
    fn declarations_give_the_kernels_layout_and_intervals_are_left_to_nft() {
        assert_eq!(
            layout("type ipv4_addr . inet_proto . inet_service : verdict;"),
            Some((
                vec![Field::Ipv4, Field::Proto, Field::Service],
                Some(vec![Field::Verdict])
            ))
        );
        assert_eq!(
            layout("typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . th dport;"),
            Some((
                vec![Field::Ipv4, Field::Proto, Field::Service, Field::HostU32],
                Some(vec![Field::Ipv4, Field::Service])
            ))
        );
        assert_eq!(layout("type ipv4_addr; flags interval;"), None);
        assert_eq!(
            layout("type ipv4_addr; flags dynamic,timeout; timeout 10s;"),
            None
        );
        assert_eq!(layout("type ether_addr;"), None);
    }

    #[test]
    fn concatenated_fields_are_padded_to_four_bytes_and_a_lone_one_is_not() {
        let key = concatenation(
            &[Field::Ipv4, Field::Proto, Field::Service, Field::HostU32],
            "10.96.0.1 . tcp . 80 . 1",
        )
        .unwrap();
        let mut want = vec![10, 96, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0];
        want.extend(1u32.to_ne_bytes());
        assert_eq!(key, want);
        assert_eq!(
            concatenation(&[Field::Service], "8080").unwrap(),
            vec![0x1f, 0x90]
        );
        assert_eq!(concatenation(&[Field::Ipv4, Field::Ipv4], "10.0.0.1"), None);
    }

    #[test]
    fn only_element_changes_of_known_types_are_encoded() {
        let mut table = Table::new(IpFamily::V4, "t");
        table.sets.insert(
            "svc".into(),
            Set::new(
                SetKind::Map,
                "type ipv4_addr . inet_proto . inet_service : verdict;",
            ),
        );
        table.sets.insert(
            "ips".into(),
            Set::new(SetKind::Set, "type ipv4_addr; flags interval;"),
        );
        let tx = |ops| Transaction {
            family: IpFamily::V4.into(),
            table: "t".into(),
            ops,
        };
        let change = tx(vec![
            Op::DeleteElements("svc".into(), vec!["10.96.0.1 . tcp . 80".into()]),
            Op::AddElements(
                "svc".into(),
                vec![(
                    "10.96.0.1 . tcp . 80".into(),
                    Some("goto service-lb-2".into()),
                )],
            ),
        ]);
        let batch = encode(&change, &table).expect("encodable");
        assert_eq!(batch.acks, 2);
        assert!(encode(&tx(vec![Op::FlushChain("c".into())]), &table).is_none());
        let interval = tx(vec![Op::AddElements(
            "ips".into(),
            vec![("10.0.0.0/8".into(), None)],
        )]);
        assert!(encode(&interval, &table).is_none());
        let bad_verdict = tx(vec![Op::AddElements(
            "svc".into(),
            vec![("10.96.0.1 . tcp . 80".into(), Some("queue".into()))],
        )]);
        assert!(encode(&bad_verdict, &table).is_none());
    }
}
