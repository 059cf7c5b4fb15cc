//! Test hosts made of network namespaces on one machine: what Calyx's integration
//! tests, benchmarks and the multi-node lab are built on.

pub mod bench;
pub mod cluster;
pub mod etcd;
pub mod lab;
pub mod objects;
pub mod services;
pub mod sockets;
