//! NetworkPolicy: the third controller, beside the overlay and the service proxy and
//! importing neither. `model` holds pods, namespaces and policies without Kubernetes
//! types; `verdict` states the API's semantics over it.

pub mod explain;
pub mod model;
pub mod parse;
pub mod verdict;
