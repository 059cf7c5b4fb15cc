//! The one raw netlink transport under route and nexthop batches (rtnetlink), IPVS
//! (generic netlink) and nftables elements and ipset entries (nfnetlink): a socket per
//! family in the calling thread's network namespace, sequence numbers, one loop that
//! sends requests and collects every acknowledgement (and a dump's replies), and one
//! attribute writer and reader. Everything else that talks netlink goes through
//! rtnetlink (`crate::netlink`).

use std::io;

use netlink_sys::{Socket, SocketAddr};

pub use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_NETFILTER, NETLINK_ROUTE};

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLA_F_NESTED: u16 = 0x8000;

/// The netlink header's length.
const HEADER: usize = 16;

/// One netlink message: the header (`seq` may be stamped later by `NlSocket`), then
/// `body`.
pub fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = HEADER + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend((len as u32).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(seq.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    out.extend(body);
    out
}

/// One nfnetlink message (nftables, ipset): the netlink header, the nfgenmsg (address
/// family, version 0, resource id in network order), then `attrs`.
pub fn nfnetlink_message(
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + attrs.len());
    body.extend([family, 0]);
    body.extend(res_id.to_be_bytes());
    body.extend(attrs);
    message(kind, flags, seq, &body)
}

/// A message as read back.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The messages of a datagram (a truncated one ends the list).
pub fn messages(datagram: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind), Some(seq)) = (
        u32_at(datagram, at),
        u16_at(datagram, at + 4),
        u32_at(datagram, at + 8),
    ) {
        let len = len as usize;
        if len < HEADER || at + len > datagram.len() {
            break;
        }
        out.push(Message {
            kind,
            seq,
            payload: &datagram[at + HEADER..at + len],
        });
        at += len.div_ceil(4) * 4;
    }
    out
}

/// An NLMSG_ERROR's code (0: an acknowledgement) and, when it is a refusal, the
/// sequence number of the request refused (from the header echoed after the code).
fn error_of(message: &Message) -> (i32, u32) {
    let code = message
        .payload
        .get(..4)
        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
    let seq = u32_at(message.payload, 4 + 8).unwrap_or(message.seq);
    (code, seq)
}

/// Netlink attributes, built front to back; a nest patches its length when closed.
#[derive(Debug, Default, Clone)]
pub struct Attrs(pub Vec<u8>);

impl Attrs {
    pub fn new() -> Attrs {
        Attrs::default()
    }

    pub fn put(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.0.extend((len as u16).to_ne_bytes());
        self.0.extend(kind.to_ne_bytes());
        self.0.extend(payload);
        self.0.resize(self.0.len().div_ceil(4) * 4, 0);
    }

    pub fn put_u16(&mut self, kind: u16, value: u16) {
        self.put(kind, &value.to_ne_bytes());
    }

    pub fn put_u32(&mut self, kind: u16, value: u32) {
        self.put(kind, &value.to_ne_bytes());
    }

    /// A NUL-terminated string.
    pub fn put_str(&mut self, kind: u16, s: &str) {
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.put(kind, &bytes);
    }

    /// A nest holding `inner`'s attributes.
    pub fn put_nested(&mut self, kind: u16, inner: &Attrs) {
        self.put(kind | NLA_F_NESTED, &inner.0);
    }

    /// Opens a nest written in place; `close` it with what this returns.
    pub fn open(&mut self, kind: u16) -> usize {
        let at = self.0.len();
        self.0.extend([0, 0]);
        self.0.extend((kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    pub fn close(&mut self, at: usize) {
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// The attributes in `buf`: (kind with the nested and byte-order flags cleared, value).
pub fn attributes(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u16_at(buf, at), u16_at(buf, at + 2)) {
        let len = len as usize;
        if len < 4 || at + len > buf.len() {
            break;
        }
        out.push((kind & 0x3fff, &buf[at + 4..at + len]));
        at += len.div_ceil(4) * 4;
    }
    out
}

/// The first attribute of `kind` in `buf`.
pub fn attribute(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(buf)
        .into_iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v)
}

/// A request the kernel refused: its sequence number and why.
#[derive(Debug)]
pub struct Refusal {
    pub seq: u32,
    pub error: io::Error,
}

/// What ends a read of replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// This many acknowledgements (refusals included) arrived.
    Acks(usize),
    /// As `Acks`, but the first refusal ends it (an nfnetlink batch: the kernel applied
    /// none of it, and may not acknowledge the rest).
    AcksOrRefusal(usize),
    /// The dump's NLMSG_DONE arrived (or a refusal of the dump itself).
    Done,
}

/// A raw netlink socket of one family.
pub struct NlSocket {
    socket: Socket,
    seq: u32,
}

impl NlSocket {
    /// A socket of `protocol` in the calling thread's network namespace, with a
    /// receive buffer of at least `receive_buffer` bytes when given, and capped
    /// acknowledgements (a refusal echoes the request's header, not the request).
    pub fn open(protocol: isize, receive_buffer: Option<usize>) -> io::Result<NlSocket> {
        let mut socket = Socket::new(protocol)?;
        if let Some(size) = receive_buffer {
            socket.set_rx_buf_sz(size)?;
        }
        socket.set_cap_ack(true)?;
        socket.bind_auto()?;
        Ok(NlSocket { socket, seq: 0 })
    }

    /// The next sequence number (never 0, which the kernel uses for its own messages).
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Stamps the next sequence numbers on `messages` (built with `message`) and
    /// concatenates them for one send; returns the bytes and the numbers, in order.
    pub fn stamp<'m>(
        &mut self,
        messages: impl IntoIterator<Item = &'m [u8]>,
    ) -> (Vec<u8>, Vec<u32>) {
        let mut bytes = Vec::new();
        let mut seqs = Vec::new();
        for m in messages {
            let seq = self.next_seq();
            let start = bytes.len();
            bytes.extend(m);
            bytes[start + 8..start + 12].copy_from_slice(&seq.to_ne_bytes());
            seqs.push(seq);
        }
        (bytes, seqs)
    }

    /// Sends `bytes` (one or more messages) and reads the replies until `until`; every
    /// reply that is not an acknowledgement goes to `each`. Returns the refusals.
    /// This is the only acknowledgement loop: every raw netlink request goes through it.
    pub fn exchange(
        &mut self,
        bytes: &[u8],
        until: Until,
        mut each: impl FnMut(&Message),
    ) -> io::Result<Vec<Refusal>> {
        self.socket.send_to(bytes, &SocketAddr::new(0, 0), 0)?;
        let mut refusals = Vec::new();
        let mut acks = 0;
        let awaited = match until {
            Until::Acks(n) | Until::AcksOrRefusal(n) => n,
            Until::Done => usize::MAX,
        };
        if awaited == 0 {
            return Ok(refusals);
        }
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            for message in messages(&datagram) {
                match message.kind {
                    NLMSG_ERROR => {
                        let (code, seq) = error_of(&message);
                        acks += 1;
                        if code != 0 {
                            refusals.push(Refusal {
                                seq,
                                error: io::Error::from_raw_os_error(-code),
                            });
                            // Only independent requests are read on past a refusal.
                            if !matches!(until, Until::Acks(_)) {
                                return Ok(refusals);
                            }
                        }
                        if acks >= awaited {
                            return Ok(refusals);
                        }
                    }
                    NLMSG_DONE if until == Until::Done => return Ok(refusals),
                    _ => each(&message),
                }
            }
        }
    }

    /// Sends `requests` (built with `message`, each asking for an acknowledgement) in
    /// writes of at most `per_write` (their acknowledgements must fit the receive
    /// buffer) and collects every acknowledgement. Returns the refused ones by their
    /// index in `requests`.
    pub fn send_all(
        &mut self,
        requests: &[Vec<u8>],
        per_write: usize,
    ) -> io::Result<Vec<(usize, io::Error)>> {
        let mut failures = Vec::new();
        for (chunk_no, chunk) in requests.chunks(per_write.max(1)).enumerate() {
            let (bytes, seqs) = self.stamp(chunk.iter().map(Vec::as_slice));
            for refusal in self.exchange(&bytes, Until::Acks(chunk.len()), |_| {})? {
                if let Some(i) = seqs.iter().position(|s| *s == refusal.seq) {
                    failures.push((chunk_no * per_write.max(1) + i, refusal.error));
                }
            }
        }
        Ok(failures)
    }

    /// A dump: sends `request` (built with `message`, NLM_F_DUMP set) and returns the
    /// payload of every reply; a refusal of the dump is an error.
    pub fn dump(&mut self, request: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let (bytes, _) = self.stamp([request]);
        let mut out = Vec::new();
        let refusals = self.exchange(&bytes, Until::Done, |m| {
            out.push((m.kind, m.payload.to_vec()))
        })?;
        match refusals.into_iter().next() {
            Some(refusal) => Err(refusal.error),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_read_back_with_nests() {
        let mut inner = Attrs::new();
        inner.put_u16(1, 7);
        inner.put_str(2, "abc");
        let mut attrs = Attrs::new();
        attrs.put(3, &[1, 2, 3]);
        attrs.put_nested(4, &inner);
        let at = attrs.open(5);
        attrs.put_u32(1, 9);
        attrs.close(at);
        assert_eq!(attrs.0.len() % 4, 0);
        let read = attributes(&attrs.0);
        assert_eq!(read.len(), 3);
        assert_eq!(read[0], (3, &[1, 2, 3][..]));
        let nest = attribute(&attrs.0, 4).unwrap();
        assert_eq!(attribute(nest, 1), Some(&7u16.to_ne_bytes()[..]));
        assert_eq!(attribute(nest, 2), Some(&b"abc\0"[..]));
        let open = attribute(&attrs.0, 5).unwrap();
        assert_eq!(attribute(open, 1), Some(&9u32.to_ne_bytes()[..]));
    }

    #[test]
    fn messages_split_a_datagram_and_stamping_numbers_each() {
        let a = message(16, NLM_F_REQUEST | NLM_F_ACK, 0, &[1, 2, 3]);
        let b = message(17, NLM_F_REQUEST, 0, &[]);
        let datagram = [a.clone(), vec![0], b.clone()].concat();
        // The first message is 19 bytes, padded to 20 (the 0 above).
        let read = messages(&datagram);
        assert_eq!(read.len(), 2);
        assert_eq!((read[0].kind, read[0].payload), (16, &[1, 2, 3][..]));
        assert_eq!(read[1].kind, 17);
        let mut socket = NlSocket::open(NETLINK_ROUTE, None).unwrap();
        let (bytes, seqs) = socket.stamp([b.as_slice(), b.as_slice()]);
        assert_eq!(seqs, vec![1, 2]);
        let read = messages(&bytes);
        assert_eq!(read.iter().map(|m| m.seq).collect::<Vec<_>>(), seqs);
    }

    #[test]
    fn a_refused_request_is_named_by_its_index_and_the_others_still_acknowledged() {
        // RTM_DELLINK of two interface indexes that do not exist, between two
        // RTM_GETLINK requests of the loopback device (index 1) with an ack: only the
        // deletes are refused. Nothing is changed in any namespace.
        const RTM_DELLINK: u16 = 17;
        const RTM_GETLINK: u16 = 18;
        let ifinfo = |index: i32| {
            let mut body = vec![0u8; 16];
            body[4..8].copy_from_slice(&index.to_ne_bytes());
            body
        };
        let get = message(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, 0, &ifinfo(1));
        let del = message(
            RTM_DELLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            0,
            &ifinfo(0x7fff_fff0),
        );
        let mut socket = NlSocket::open(NETLINK_ROUTE, None).unwrap();
        let failures = socket
            .send_all(&[get.clone(), del.clone(), get, del], 3)
            .unwrap();
        let refused: Vec<usize> = failures.iter().map(|(i, _)| *i).collect();
        assert_eq!(refused, vec![1, 3]);
        assert!(
            failures.iter().all(|(_, e)| e.raw_os_error() == Some(19)),
            "{failures:?}"
        );
    }
}
