//! IPVS virtual services and their real servers, over generic netlink (the kernel's
//! "IPVS" family, as ipvsadm speaks it, without ipvsadm processes): typed objects, a
//! dump, a plan of the difference, one batch of requests per apply, and a recording
//! fake for tests.
//!
//! The family is resolved through `netlink-packet-generic`'s controller, which also
//! writes the generic netlink header; the IPVS attributes (a few fixed-size fields,
//! include/uapi/linux/ip_vs.h) are encoded here, and the requests travel over the
//! crate's one netlink transport (`crate::nl`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, ParseableParametrized,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

use crate::nl::{
    self, Attrs, NlSocket, Until, NETLINK_GENERIC, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};

const CMD_NEW_SERVICE: u8 = 1;
const CMD_SET_SERVICE: u8 = 2;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;

const ATTR_SERVICE: u16 = 1;
const ATTR_DEST: u16 = 2;

const SVC_AF: u16 = 1;
const SVC_PROTOCOL: u16 = 2;
const SVC_ADDR: u16 = 3;
const SVC_PORT: u16 = 4;
const SVC_FWMARK: u16 = 5;
const SVC_SCHED_NAME: u16 = 6;
const SVC_FLAGS: u16 = 7;
const SVC_TIMEOUT: u16 = 8;
const SVC_NETMASK: u16 = 9;

const DEST_ADDR: u16 = 1;
const DEST_PORT: u16 = 2;
const DEST_FWD_METHOD: u16 = 3;
const DEST_WEIGHT: u16 = 4;
const DEST_U_THRESH: u16 = 5;
const DEST_L_THRESH: u16 = 6;
const DEST_ACTIVE_CONNS: u16 = 7;
const DEST_INACT_CONNS: u16 = 8;
const DEST_ADDR_FAMILY: u16 = 11;

const SVC_F_PERSISTENT: u32 = 0x1;
/// The kernel sets this on every service it holds; not ours to compare.
const SVC_F_HASHED: u32 = 0x2;
/// Masquerading (NAT) forwarding; the other methods (DR, tunnel) are not used.
const FWD_MASQ: u32 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// CTRL_ATTR_FAMILY_ID in the controller's reply.
const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// The generic netlink header before a message's attributes.
const GENL_HEADER: usize = 4;

/// Requests per write before the acknowledgements are read. Each acknowledgement takes
/// about a kilobyte of the socket's receive buffer (its skb): 512 at once overflowed the
/// default buffer (ENOBUFS, seen at the first sync of 1,000 Services).
const REQUESTS_PER_WRITE: usize = 128;
/// The receive buffer asked for (the kernel caps it at net.core.rmem_max).
const RECEIVE_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The kernel has no IPVS (module missing, or not built): says what to do.
    #[error("IPVS is not available in this kernel ({0}); load the ip_vs module (modprobe ip_vs)")]
    Unavailable(String),
    #[error("IPVS {what}: {why}")]
    Request { what: String, why: String },
    #[error("IPVS socket: {0}")]
    Socket(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, IpvsError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn number(self) -> u16 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    fn from_number(n: u16) -> Option<Protocol> {
        Some(match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// What identifies a virtual service: address, protocol, port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub address: SocketAddr,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.protocol.name(), self.address)
    }
}

/// A virtual service's settings (what ipvsadm -A takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    /// rr, wrr, lc, sh, mh, ...
    pub scheduler: String,
    /// Persistence (sessionAffinity ClientIP): its timeout in seconds.
    pub persistence: Option<u32>,
    /// Scheduler flags (IP_VS_SVC_F_SCHED1..3: sh/mh fallback and port hashing).
    pub scheduler_flags: u32,
}

/// A real server as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealServer {
    pub weight: u32,
    /// Connection counts: read back from the kernel, ignored when writing.
    pub active: u32,
    pub inactive: u32,
}

/// One virtual service with its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualService {
    pub settings: ServiceSettings,
    pub servers: BTreeMap<SocketAddr, RealServer>,
}

/// What the kernel holds (or should): every virtual service by id. Services marked by
/// fwmark are not listed (never Calyx's; never touched).
pub type Services = BTreeMap<ServiceId, VirtualService>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddService(ServiceId, ServiceSettings),
    UpdateService(ServiceId, ServiceSettings),
    DeleteService(ServiceId),
    AddServer(ServiceId, SocketAddr, u32),
    UpdateServer(ServiceId, SocketAddr, u32),
    DeleteServer(ServiceId, SocketAddr),
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::AddService(id, s) => write!(f, "add service {id} ({})", s.scheduler),
            Op::UpdateService(id, s) => write!(f, "update service {id} ({})", s.scheduler),
            Op::DeleteService(id) => write!(f, "delete service {id}"),
            Op::AddServer(id, rs, w) => write!(f, "add real server {rs} weight {w} to {id}"),
            Op::UpdateServer(id, rs, w) => {
                write!(f, "set real server {rs} of {id} to weight {w}")
            }
            Op::DeleteServer(id, rs) => write!(f, "delete real server {rs} of {id}"),
        }
    }
}

/// The ops that turn `current` into `desired`, for the services `owned` says are the
/// caller's (others are left as they are, whatever `desired` says of them). A service
/// whose address family or scheduler changes is updated in place; real servers follow.
pub fn plan(current: &Services, desired: &Services, owned: impl Fn(&ServiceId) -> bool) -> Vec<Op> {
    let mut ops = Vec::new();
    for id in current.keys() {
        if !desired.contains_key(id) {
            plan_service(id, current, desired, &owned, &mut ops);
        }
    }
    for id in desired.keys() {
        plan_service(id, current, desired, &owned, &mut ops);
    }
    ops
}

/// `plan` for the services in `ids` only (a partial sync: the rest is as it was).
pub fn plan_only<'a>(
    ids: impl IntoIterator<Item = &'a ServiceId>,
    current: &Services,
    desired: &Services,
    owned: impl Fn(&ServiceId) -> bool,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for id in ids {
        plan_service(id, current, desired, &owned, &mut ops);
    }
    ops
}

/// The ops that bring one service from `current` to `desired`.
fn plan_service(
    id: &ServiceId,
    current: &Services,
    desired: &Services,
    owned: &impl Fn(&ServiceId) -> bool,
    ops: &mut Vec<Op>,
) {
    match (current.get(id), desired.get(id)) {
        (None, None) => {}
        (Some(_), None) => {
            if owned(id) {
                ops.push(Op::DeleteService(*id));
            }
        }
        (None, Some(want)) => {
            ops.push(Op::AddService(*id, want.settings.clone()));
            for (rs, server) in &want.servers {
                ops.push(Op::AddServer(*id, *rs, server.weight));
            }
        }
        (Some(_), Some(_)) if !owned(id) => {}
        (Some(held), Some(want)) => {
            if held.settings != want.settings {
                ops.push(Op::UpdateService(*id, want.settings.clone()));
            }
            for rs in held.servers.keys() {
                if !want.servers.contains_key(rs) {
                    ops.push(Op::DeleteServer(*id, *rs));
                }
            }
            for (rs, server) in &want.servers {
                match held.servers.get(rs) {
                    None => ops.push(Op::AddServer(*id, *rs, server.weight)),
                    Some(h) if h.weight != server.weight => {
                        ops.push(Op::UpdateServer(*id, *rs, server.weight))
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

/// Applies `ops` to `services` as the kernel would (for the fake and for callers that
/// keep what they last wrote).
pub fn apply_to(services: &mut Services, ops: &[Op]) {
    for op in ops {
        match op {
            Op::AddService(id, settings) | Op::UpdateService(id, settings) => {
                services
                    .entry(*id)
                    .or_insert_with(|| VirtualService {
                        settings: settings.clone(),
                        servers: BTreeMap::new(),
                    })
                    .settings = settings.clone();
            }
            Op::DeleteService(id) => {
                services.remove(id);
            }
            Op::AddServer(id, rs, weight) | Op::UpdateServer(id, rs, weight) => {
                if let Some(vs) = services.get_mut(id) {
                    let server = vs.servers.entry(*rs).or_insert(RealServer {
                        weight: *weight,
                        active: 0,
                        inactive: 0,
                    });
                    server.weight = *weight;
                }
            }
            Op::DeleteServer(id, rs) => {
                if let Some(vs) = services.get_mut(id) {
                    vs.servers.remove(rs);
                }
            }
        }
    }
}

/// Where IPVS state lives: the kernel, or a fake.
pub trait Backend: Send + Sync {
    fn dump(&self) -> Result<Services>;
    /// Every op is tried; the first failure is returned (naming its object), the others
    /// having taken effect.
    fn apply(&self, ops: &[Op]) -> Result<()>;

    /// One service's real servers with their connection counts (none when there is
    /// no such service). The kernel's backend reads only that service.
    fn servers(&self, id: &ServiceId) -> Result<BTreeMap<SocketAddr, RealServer>> {
        Ok(self
            .dump()?
            .remove(id)
            .map(|vs| vs.servers)
            .unwrap_or_default())
    }
}

/// A shared backend is a backend: tests keep a handle on the fake they hand over.
impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn dump(&self) -> Result<Services> {
        (**self).dump()
    }
    fn apply(&self, ops: &[Op]) -> Result<()> {
        (**self).apply(ops)
    }
    fn servers(&self, id: &ServiceId) -> Result<BTreeMap<SocketAddr, RealServer>> {
        (**self).servers(id)
    }
}

/// The kernel's IPVS, in the caller's network namespace.
pub struct IpvsNetlink {
    family: u16,
}

impl IpvsNetlink {
    /// Resolves the IPVS family: fails with `Unavailable` when the kernel has none.
    pub fn open() -> Result<IpvsNetlink> {
        let mut socket = open_socket()?;
        let mut msg = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName("IPVS".to_string())],
        });
        msg.finalize();
        let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        let (request, _) = socket.stamp([buf.as_slice()]);
        let mut family = None;
        let refusals = socket.exchange(&request, Until::Acks(1), |reply| {
            let id = reply
                .payload
                .get(GENL_HEADER..)
                .and_then(|attrs| nl::attribute(attrs, CTRL_ATTR_FAMILY_ID))
                .and_then(|v| Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?)));
            family = family.or(id);
        })?;
        if let Some(refusal) = refusals.into_iter().next() {
            return Err(IpvsError::Unavailable(refusal.error.to_string()));
        }
        family
            .map(|family| IpvsNetlink { family })
            .ok_or_else(|| IpvsError::Unavailable("no family id in the reply".into()))
    }

    /// One IPVS request (its sequence number is stamped when sent).
    fn message(&self, cmd: u8, attrs: Attrs, flags: u16) -> Vec<u8> {
        let mut genl = GenlMessage::new(
            GenlHeader { cmd, version: 1 },
            Raw {
                cmd,
                attrs: attrs.0,
            },
            self.family,
        );
        genl.finalize();
        let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(genl));
        nl.header.flags = flags;
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        buf
    }

    /// One dump request on `socket` (a dump of every service's servers reuses one
    /// socket rather than opening one per service); the attributes of each reply.
    fn dump_of(&self, socket: &mut NlSocket, cmd: u8, attrs: Attrs) -> Result<Vec<Vec<u8>>> {
        let replies = socket
            .dump(&self.message(cmd, attrs, NLM_F_REQUEST | NLM_F_DUMP))
            .map_err(|e| IpvsError::Request {
                what: "dump".into(),
                why: e.to_string(),
            })?;
        Ok(replies
            .into_iter()
            .filter_map(|(_, payload)| payload.get(GENL_HEADER..).map(<[u8]>::to_vec))
            .collect())
    }
}

impl Backend for IpvsNetlink {
    fn dump(&self) -> Result<Services> {
        let mut socket = open_socket()?;
        let mut services = Services::new();
        for attrs in self.dump_of(&mut socket, CMD_GET_SERVICE, Attrs::new())? {
            let Some(svc) = nested(&attrs, ATTR_SERVICE) else {
                continue;
            };
            let Some((id, settings)) = parse_service(&svc) else {
                continue; // fwmark services and unknown protocols: not ours.
            };
            services.insert(
                id,
                VirtualService {
                    settings,
                    servers: BTreeMap::new(),
                },
            );
        }
        for (id, vs) in services.iter_mut() {
            let mut attrs = Attrs::new();
            attrs.put_nested(ATTR_SERVICE, &service_identity(id));
            for reply in self.dump_of(&mut socket, CMD_GET_DEST, attrs)? {
                let Some(dest) = nested(&reply, ATTR_DEST) else {
                    continue;
                };
                if let Some((rs, server)) = parse_dest(&dest, id) {
                    vs.servers.insert(rs, server);
                }
            }
        }
        Ok(services)
    }

    fn servers(&self, id: &ServiceId) -> Result<BTreeMap<SocketAddr, RealServer>> {
        let mut attrs = Attrs::new();
        attrs.put_nested(ATTR_SERVICE, &service_identity(id));
        let mut servers = BTreeMap::new();
        for reply in self.dump_of(&mut open_socket()?, CMD_GET_DEST, attrs)? {
            if let Some((rs, server)) = nested(&reply, ATTR_DEST).and_then(|d| parse_dest(&d, id)) {
                servers.insert(rs, server);
            }
        }
        Ok(servers)
    }

    fn apply(&self, ops: &[Op]) -> Result<()> {
        let mut socket = open_socket()?;
        let requests: Vec<Vec<u8>> = ops
            .iter()
            .map(|op| {
                let (cmd, attrs) = encode(op);
                self.message(cmd, attrs, NLM_F_REQUEST | NLM_F_ACK)
            })
            .collect();
        let failures = socket.send_all(&requests, REQUESTS_PER_WRITE)?;
        match failures.into_iter().next() {
            Some((i, error)) => Err(IpvsError::Request {
                what: ops[i].to_string(),
                why: error.to_string(),
            }),
            None => Ok(()),
        }
    }
}

fn open_socket() -> Result<NlSocket> {
    Ok(NlSocket::open(NETLINK_GENERIC, Some(RECEIVE_BUFFER))?)
}

/// An IPVS message body: its command and attributes, encoded here.
#[derive(Debug, Clone)]
struct Raw {
    cmd: u8,
    attrs: Vec<u8>,
}

impl GenlFamily for Raw {
    fn family_name() -> &'static str {
        "IPVS"
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for Raw {
    fn buffer_len(&self) -> usize {
        self.attrs.len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        buffer[..self.attrs.len()].copy_from_slice(&self.attrs);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for Raw {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> std::result::Result<Self, DecodeError> {
        Ok(Raw {
            cmd: header.cmd,
            attrs: buf.to_vec(),
        })
    }
}

fn family_of(ip: &IpAddr) -> u16 {
    if ip.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The attributes that name a service (enough for a delete, a dump of its servers).
fn service_identity(id: &ServiceId) -> Attrs {
    let mut attrs = Attrs::new();
    attrs.put_u16(SVC_AF, family_of(&id.address.ip()));
    attrs.put_u16(SVC_PROTOCOL, id.protocol.number());
    attrs.put(SVC_ADDR, &ip_bytes(&id.address.ip()));
    attrs.put(SVC_PORT, &id.address.port().to_be_bytes());
    attrs
}

fn service_full(id: &ServiceId, s: &ServiceSettings) -> Attrs {
    let mut attrs = service_identity(id);
    attrs.put_str(SVC_SCHED_NAME, &s.scheduler);
    let flags = s.scheduler_flags
        | if s.persistence.is_some() {
            SVC_F_PERSISTENT
        } else {
            0
        };
    let mut fl = flags.to_ne_bytes().to_vec();
    fl.extend(u32::MAX.to_ne_bytes());
    attrs.put(SVC_FLAGS, &fl);
    attrs.put_u32(SVC_TIMEOUT, s.persistence.unwrap_or(0));
    let netmask = if id.address.is_ipv4() { u32::MAX } else { 128 };
    attrs.put_u32(SVC_NETMASK, netmask);
    attrs
}

fn dest_attrs(rs: &SocketAddr, weight: Option<u32>) -> Attrs {
    let mut attrs = Attrs::new();
    attrs.put(DEST_ADDR, &ip_bytes(&rs.ip()));
    attrs.put(DEST_PORT, &rs.port().to_be_bytes());
    if let Some(weight) = weight {
        attrs.put_u32(DEST_FWD_METHOD, FWD_MASQ);
        attrs.put_u32(DEST_WEIGHT, weight);
        attrs.put_u32(DEST_U_THRESH, 0);
        attrs.put_u32(DEST_L_THRESH, 0);
        attrs.put_u16(DEST_ADDR_FAMILY, family_of(&rs.ip()));
    }
    attrs
}

fn encode(op: &Op) -> (u8, Attrs) {
    let mut attrs = Attrs::new();
    let cmd = match op {
        Op::AddService(id, s) | Op::UpdateService(id, s) => {
            attrs.put_nested(ATTR_SERVICE, &service_full(id, s));
            if matches!(op, Op::AddService(..)) {
                CMD_NEW_SERVICE
            } else {
                CMD_SET_SERVICE
            }
        }
        Op::DeleteService(id) => {
            attrs.put_nested(ATTR_SERVICE, &service_identity(id));
            CMD_DEL_SERVICE
        }
        Op::AddServer(id, rs, w) | Op::UpdateServer(id, rs, w) => {
            attrs.put_nested(ATTR_SERVICE, &service_identity(id));
            attrs.put_nested(ATTR_DEST, &dest_attrs(rs, Some(*w)));
            if matches!(op, Op::AddServer(..)) {
                CMD_NEW_DEST
            } else {
                CMD_SET_DEST
            }
        }
        Op::DeleteServer(id, rs) => {
            attrs.put_nested(ATTR_SERVICE, &service_identity(id));
            attrs.put_nested(ATTR_DEST, &dest_attrs(rs, None));
            CMD_DEL_DEST
        }
    };
    (cmd, attrs)
}

/// The attributes of `buf`, by kind (nested flag cleared).
fn attributes(buf: &[u8]) -> BTreeMap<u16, Vec<u8>> {
    nl::attributes(buf)
        .into_iter()
        .map(|(kind, value)| (kind, value.to_vec()))
        .collect()
}

fn nested(buf: &[u8], kind: u16) -> Option<Vec<u8>> {
    attributes(buf).remove(&kind)
}

fn u16_of(v: Option<&Vec<u8>>) -> Option<u16> {
    Some(u16::from_ne_bytes(v?.get(..2)?.try_into().ok()?))
}

fn u32_of(v: Option<&Vec<u8>>) -> Option<u32> {
    Some(u32::from_ne_bytes(v?.get(..4)?.try_into().ok()?))
}

fn ip_of(af: u16, v: Option<&Vec<u8>>) -> Option<IpAddr> {
    let v = v?;
    match af {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(v.get(..4)?).ok()?,
        ))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(v.get(..16)?).ok()?,
        ))),
        _ => None,
    }
}

fn parse_service(buf: &[u8]) -> Option<(ServiceId, ServiceSettings)> {
    let a = attributes(buf);
    if u32_of(a.get(&SVC_FWMARK)).unwrap_or(0) != 0 {
        return None;
    }
    let af = u16_of(a.get(&SVC_AF))?;
    let ip = ip_of(af, a.get(&SVC_ADDR))?;
    let port = u16::from_be_bytes(a.get(&SVC_PORT)?.get(..2)?.try_into().ok()?);
    let protocol = Protocol::from_number(u16_of(a.get(&SVC_PROTOCOL))?)?;
    let scheduler = String::from_utf8_lossy(a.get(&SVC_SCHED_NAME)?)
        .trim_end_matches('\0')
        .to_string();
    let flags = u32_of(a.get(&SVC_FLAGS)).unwrap_or(0) & !SVC_F_HASHED;
    let persistence =
        (flags & SVC_F_PERSISTENT != 0).then(|| u32_of(a.get(&SVC_TIMEOUT)).unwrap_or(0));
    Some((
        ServiceId {
            address: SocketAddr::new(ip, port),
            protocol,
        },
        ServiceSettings {
            scheduler,
            persistence,
            scheduler_flags: flags & !SVC_F_PERSISTENT,
        },
    ))
}

fn parse_dest(buf: &[u8], service: &ServiceId) -> Option<(SocketAddr, RealServer)> {
    let a = attributes(buf);
    let af = u16_of(a.get(&DEST_ADDR_FAMILY)).unwrap_or(family_of(&service.address.ip()));
    let ip = ip_of(af, a.get(&DEST_ADDR))?;
    let port = u16::from_be_bytes(a.get(&DEST_PORT)?.get(..2)?.try_into().ok()?);
    Some((
        SocketAddr::new(ip, port),
        RealServer {
            weight: u32_of(a.get(&DEST_WEIGHT)).unwrap_or(0),
            active: u32_of(a.get(&DEST_ACTIVE_CONNS)).unwrap_or(0),
            inactive: u32_of(a.get(&DEST_INACT_CONNS)).unwrap_or(0),
        },
    ))
}

/// A fake IPVS for tests: holds services, counts the ops written, refuses what the
/// kernel would (a duplicate add, a change to something missing).
#[derive(Default)]
pub struct RecordingIpvs {
    pub state: Mutex<Services>,
    pub written: Mutex<Vec<Op>>,
}

impl RecordingIpvs {
    pub fn new() -> RecordingIpvs {
        RecordingIpvs::default()
    }

    pub fn services(&self) -> Services {
        self.state.lock().unwrap().clone()
    }

    pub fn take_written(&self) -> Vec<Op> {
        std::mem::take(&mut self.written.lock().unwrap())
    }

    /// Sets a server's connection counts, as traffic would.
    pub fn set_connections(&self, id: &ServiceId, rs: &SocketAddr, active: u32, inactive: u32) {
        if let Some(server) = self
            .state
            .lock()
            .unwrap()
            .get_mut(id)
            .and_then(|vs| vs.servers.get_mut(rs))
        {
            server.active = active;
            server.inactive = inactive;
        }
    }
}

impl Backend for RecordingIpvs {
    fn dump(&self) -> Result<Services> {
        Ok(self.services())
    }

    fn apply(&self, ops: &[Op]) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        for op in ops {
            let refused = match op {
                Op::AddService(id, _) => state.contains_key(id),
                Op::UpdateService(id, _) | Op::DeleteService(id) => !state.contains_key(id),
                Op::AddServer(id, rs, _) => {
                    state.get(id).is_none_or(|vs| vs.servers.contains_key(rs))
                }
                Op::UpdateServer(id, rs, _) | Op::DeleteServer(id, rs) => {
                    state.get(id).is_none_or(|vs| !vs.servers.contains_key(rs))
                }
            };
            if refused {
                return Err(IpvsError::Request {
                    what: op.to_string(),
                    why: "refused by the fake (as the kernel would)".into(),
                });
            }
            apply_to(&mut state, std::slice::from_ref(op));
            self.written.lock().unwrap().push(op.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str, protocol: Protocol) -> ServiceId {
        ServiceId {
            address: s.parse().unwrap(),
            protocol,
        }
    }

    fn rr() -> ServiceSettings {
        ServiceSettings {
            scheduler: "rr".into(),
            persistence: None,
            scheduler_flags: 0,
        }
    }

    fn vs(settings: ServiceSettings, servers: &[(&str, u32)]) -> VirtualService {
        VirtualService {
            settings,
            servers: servers
                .iter()
                .map(|(a, w)| {
                    (
                        a.parse().unwrap(),
                        RealServer {
                            weight: *w,
                            active: 0,
                            inactive: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_service_encodes_and_parses_back() {
        for (addr, persistence) in [("10.96.0.10:80", Some(10800)), ("[fd00::10]:53", None)] {
            let id = id(addr, Protocol::Udp);
            let settings = ServiceSettings {
                scheduler: "mh".into(),
                persistence,
                scheduler_flags: 0x8,
            };
            let (cmd, attrs) = encode(&Op::AddService(id, settings.clone()));
            assert_eq!(cmd, CMD_NEW_SERVICE);
            let svc = nested(&attrs.0, ATTR_SERVICE).unwrap();
            assert_eq!(parse_service(&svc), Some((id, settings)));
        }
    }

    #[test]
    fn a_real_server_encodes_and_parses_back() {
        let svc = id("[fd00::10]:80", Protocol::Tcp);
        let (cmd, attrs) = encode(&Op::AddServer(
            svc,
            "[fd00:244::2]:8080".parse().unwrap(),
            0,
        ));
        assert_eq!(cmd, CMD_NEW_DEST);
        let dest = nested(&attrs.0, ATTR_DEST).unwrap();
        let (rs, server) = parse_dest(&dest, &svc).unwrap();
        assert_eq!(rs, "[fd00:244::2]:8080".parse().unwrap());
        assert_eq!(server.weight, 0);
    }

    #[test]
    fn plan_writes_only_the_difference_and_leaves_foreign_services_alone() {
        let web = id("10.96.0.10:80", Protocol::Tcp);
        let foreign = id("192.0.2.50:8080", Protocol::Tcp);
        let mut current = Services::new();
        current.insert(
            web,
            vs(rr(), &[("10.244.1.2:8080", 1), ("10.244.2.2:8080", 1)]),
        );
        current.insert(foreign, vs(rr(), &[("192.0.2.60:80", 1)]));
        let mut desired = Services::new();
        desired.insert(
            web,
            vs(rr(), &[("10.244.1.2:8080", 1), ("10.244.2.2:8080", 0)]),
        );
        let owned = |id: &ServiceId| id.address.ip().to_string().starts_with("10.96.");
        let ops = plan(&current, &desired, owned);
        assert_eq!(
            ops,
            vec![Op::UpdateServer(web, "10.244.2.2:8080".parse().unwrap(), 0)]
        );
        apply_to(&mut current, &ops);
        assert!(plan(&current, &desired, owned).is_empty());
        assert!(current.contains_key(&foreign));
        // A partial plan looks at the services it is given, and only at them.
        let api = id("10.96.0.11:443", Protocol::Tcp);
        desired.insert(api, vs(rr(), &[("10.244.3.2:6443", 1)]));
        assert!(plan_only([&web, &foreign], &current, &desired, owned).is_empty());
        assert_eq!(
            plan_only([&api], &current, &desired, owned),
            vec![
                Op::AddService(api, rr()),
                Op::AddServer(api, "10.244.3.2:6443".parse().unwrap(), 1)
            ]
        );
        desired.remove(&web);
        assert_eq!(
            plan_only([&web], &current, &desired, owned),
            vec![Op::DeleteService(web)]
        );
    }
}
