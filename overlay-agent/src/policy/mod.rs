//! NetworkPolicy: the third controller, beside the overlay and the service proxy and
//! importing neither. `model` holds pods, namespaces and policies without Kubernetes
//! types; `verdict` states the API's semantics over it; `table` is the nftables table
//! a node wants for it, as data; `trace` runs packets through such a table; `holds`
//! keeps new pods held until the table has their entries.

pub mod controller;
pub mod explain;
pub mod holds;
pub mod model;
pub mod parse;
pub mod table;
#[cfg(test)]
mod trace;
pub mod verdict;
