//! One proxier per mode behind one interface, as kube-proxy has it: the controller
//! works out which Services changed and what their port plans are now; a proxier
//! turns those into its mode's kernel objects, keeping whatever state it needs across
//! syncs, and writes only what differs.

use std::time::{Duration, Instant};

use calyx_dataplane::firewall::{FirewallError, IpFamily};

use super::model::{PortPlan, ServiceKey};

/// How much a sync covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every Service is given; the proxier rebuilds its state from them and compares
    /// all of it with the kernel (`reread`: read the kernel, not what was last
    /// written).
    Full { reread: bool },
    /// Only the Services that changed since the last successful sync are given; the
    /// rest are as that sync left them.
    Partial,
}

/// One Service's new port plans in one family (none: it is gone from that family).
pub type ServiceUpdate = (ServiceKey, Vec<PortPlan>);

/// What one sync hands a proxier for one family.
pub struct Changes<'a> {
    pub scope: Scope,
    /// The Services to recompute in this family and their port plans, sorted by key.
    pub services: &'a [ServiceUpdate],
    /// The node's health-check ports (eTP Local Services), which IPVS mode opens.
    pub health_check_ports: &'a [u16],
}

#[derive(Debug, thiserror::Error)]
pub enum ProxierError {
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Ipvs(#[from] calyx_dataplane::ipvs::IpvsError),
    #[error(transparent)]
    Dataplane(#[from] calyx_dataplane::DataplaneError),
}

pub type Result<T> = std::result::Result<T, ProxierError>;

/// A proxy mode's writer. A sync is `begin`, then `sync` for IPv4 and IPv6 in turn
/// (the controller clears a family's stale UDP flows as soon as that family is
/// written). After a failure the proxier must not trust what it last wrote: the
/// controller follows it with a `Scope::Full`.
pub trait Proxier: Send {
    /// Once per sync, before the families: what both share (the kernel read at start,
    /// the node's addresses).
    fn begin(&mut self, scope: Scope) -> Result<()>;

    /// Writes one family's changes; returns how many kernel writes (transaction steps)
    /// it took.
    fn sync(&mut self, family: IpFamily, changes: &Changes) -> Result<usize>;

    /// The periodic look: why the kernel no longer holds what this proxier wrote (a
    /// table or chain deleted, a jump removed or pushed below someone else's rule, the
    /// node's addresses changed), read cheaply; None when it still does. Only asked
    /// after a successful sync.
    fn drifted(&mut self) -> Option<String>;

    /// Periodic housekeeping besides syncs (IPVS mode removes drained real servers).
    fn housekeeping(&mut self) {}
}

/// What the kernel held at start, both families, read on another thread while the
/// source lists (both take a while with many Services), for the first full sync.
pub struct Prefetch<T> {
    started: Instant,
    handle: std::thread::JoinHandle<[std::result::Result<T, FirewallError>; 2]>,
}

/// A read older than this is not trusted (a source that took long to list): the
/// kernel is read again then.
const PREFETCH_FRESH: Duration = Duration::from_secs(30);

impl<T: Send + 'static> Prefetch<T> {
    /// Starts `read` on its own thread (None: no thread could be started).
    pub fn start(
        read: impl FnOnce() -> [std::result::Result<T, FirewallError>; 2] + Send + 'static,
    ) -> Option<Prefetch<T>> {
        let handle = std::thread::Builder::new()
            .name("proxy-prefetch".into())
            .spawn(read)
            .ok()?;
        Some(Prefetch {
            started: Instant::now(),
            handle,
        })
    }

    /// Both families' reads, when both succeeded and are fresh.
    fn take(self) -> Option<[T; 2]> {
        let [Ok(v4), Ok(v6)] = self.handle.join().ok()? else {
            return None;
        };
        (self.started.elapsed() <= PREFETCH_FRESH).then_some([v4, v6])
    }

    /// At the begin of a sync: hands a fresh start-up read (once) to `start_from`, by
    /// family index, and says whether this sync must read the kernel itself (a full
    /// sync asked to, and nothing fresh was read at start).
    pub fn begin(
        prefetch: &mut Option<Prefetch<T>>,
        scope: Scope,
        mut start_from: impl FnMut(usize, T),
    ) -> bool {
        let primed = match prefetch.take().and_then(Prefetch::take) {
            Some(reads) => {
                for (i, read) in reads.into_iter().enumerate() {
                    start_from(i, read);
                }
                true
            }
            None => false,
        };
        matches!(scope, Scope::Full { reread: true }) && !primed
    }
}
