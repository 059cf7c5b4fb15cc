//! Test support for the proxy: fixtures of the model, and fakes of what the recording
//! fakes of the dataplane do not cover.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::ipvs::addresses::Addresses;
use super::model::*;

pub fn key(name: &str) -> ServiceKey {
    ServiceKey {
        namespace: "default".into(),
        name: name.into(),
    }
}

pub fn service(name: &str, cluster_ip: &str, port: u16) -> Service {
    Service {
        key: key(name),
        cluster_ips: vec![cluster_ip.parse().unwrap()],
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port,
            node_port: None,
        }],
        affinity_seconds: None,
        external_local: false,
        internal_local: false,
        health_check_node_port: None,
        ipvs_scheduler: None,
    }
}

pub fn endpoint(ip: &str, node: &str) -> Endpoint {
    Endpoint {
        address: ip.parse().unwrap(),
        ready: true,
        serving: true,
        terminating: false,
        node: Some(node.into()),
        zone_hints: vec![],
        node_hints: vec![],
    }
}

pub fn slice(name: &str, target_port: u16, endpoints: Vec<Endpoint>) -> Slice {
    Slice {
        service: key(name),
        ports: vec![SlicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: target_port,
        }],
        endpoints,
        trigger_time: None,
    }
}

pub fn state(services: Vec<Service>, slices: Vec<Slice>) -> ProxyState {
    ProxyState {
        services: services
            .into_iter()
            .map(|s| (s.key.clone(), Arc::new(s)))
            .collect(),
        slices: slices
            .into_iter()
            .map(|s| (s.service.clone(), Arc::new(s)))
            .collect(),
        node_zone: None,
    }
}

/// A slice of `name` to change (a new object, as a source would make).
pub fn slice_mut<'s>(st: &'s mut ProxyState, name: &str) -> &'s mut Slice {
    Arc::make_mut(st.slices.get_mut(&key(name)).unwrap())
}

/// kube-ipvs0 as data; node address 192.0.2.11.
#[derive(Default)]
pub struct FakeAddresses(pub Mutex<Option<BTreeSet<IpAddr>>>);

impl Addresses for Arc<FakeAddresses> {
    fn held(&self) -> calyx_dataplane::Result<Option<BTreeSet<IpAddr>>> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn create_device(&self) -> calyx_dataplane::Result<()> {
        *self.0.lock().unwrap() = Some(BTreeSet::new());
        Ok(())
    }
    fn add(&self, ips: &[IpAddr]) -> calyx_dataplane::Result<()> {
        self.0.lock().unwrap().as_mut().unwrap().extend(ips);
        Ok(())
    }
    fn remove(&self, ips: &[IpAddr]) -> calyx_dataplane::Result<()> {
        let mut held = self.0.lock().unwrap();
        for ip in ips {
            held.as_mut().unwrap().remove(ip);
        }
        Ok(())
    }
    fn node_ips(&self, _: &[ipnetwork::IpNetwork]) -> calyx_dataplane::Result<Vec<IpAddr>> {
        Ok(vec!["192.0.2.11".parse().unwrap()])
    }
    fn remove_device(&self) -> calyx_dataplane::Result<()> {
        *self.0.lock().unwrap() = None;
        Ok(())
    }
}
