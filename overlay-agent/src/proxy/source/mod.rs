//! Where the proxy's model comes from: the Kubernetes API (`kube`), or the agent's
//! directory source (`crate::source::dir`). The controller programs nothing until the
//! first snapshot (both streams listed once) is in.

pub mod kube;
pub mod objects;

use crate::proxy::model::ProxyState;

pub type Snapshot = crate::source::Snapshot<ProxyState>;
pub type Publisher = crate::source::Publisher<ProxyState>;
