//! Where the proxy's model comes from: the agent's sources (`crate::source`: the
//! Kubernetes API or a directory), converted by `objects`. The controller programs nothing until the
//! first snapshot (both streams listed once) is in.

pub mod objects;

use crate::proxy::model::ProxyState;

pub type Snapshot = crate::source::Snapshot<ProxyState>;
