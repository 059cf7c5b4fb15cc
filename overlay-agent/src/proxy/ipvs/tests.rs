//! IPVS mode on its recording fakes.

use super::desired::*;
use super::sync::*;
use super::*;
use crate::proxy::model::port_plans;
use crate::proxy::testing::{endpoint, service, slice, state, FakeAddresses};
use calyx_dataplane::firewall::ipset::RecordingIpset;
use calyx_dataplane::firewall::iptables::{RecordingIptables, RulesetSync};
use calyx_dataplane::ipvs::RecordingIpvs;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::proxy::model::PortPlan;
use calyx_dataplane::ipvs::{ServiceId, ServiceSettings};

const NODE_IPS: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 11))];

fn node() -> Node<'static> {
    Node {
        nodeport_ips: &NODE_IPS,
        health_check_ports: &[],
        default_scheduler: "rr",
    }
}

fn web_state(endpoints: &[&str]) -> crate::proxy::model::ProxyState {
    let mut svc = service("web", "10.96.0.10", 80);
    svc.ports[0].node_port = Some(30080);
    svc.ipvs_scheduler = Some("mh".into());
    state(
        vec![svc],
        vec![slice(
            "web",
            8080,
            endpoints.iter().map(|ip| endpoint(ip, "n1")).collect(),
        )],
    )
}

fn id(s: &str) -> ServiceId {
    ServiceId {
        address: s.parse().unwrap(),
        protocol: ipvs::Protocol::Tcp,
    }
}

#[test]
fn a_service_becomes_virtual_services_addresses_and_set_entries() {
    let plans = port_plans(
        &web_state(&["10.244.1.2", "10.244.2.2"]),
        "n1",
        IpFamily::V4,
    );
    let want = desired(&plans, IpFamily::V4, &node());
    let cluster = &want.services[&id("10.96.0.10:80")];
    assert_eq!(cluster.settings.scheduler, "mh");
    assert_eq!(cluster.servers.len(), 2);
    assert_eq!(want.services[&id("192.0.2.11:30080")].servers.len(), 2);
    assert_eq!(
        want.addresses,
        BTreeSet::from(["10.96.0.10".parse().unwrap()])
    );
    let set = |name: &str| {
        want.sets
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.entries.iter().cloned().collect::<Vec<_>>())
            .unwrap()
    };
    assert_eq!(set("KUBE-CLUSTER-IP"), vec!["10.96.0.10,tcp:80"]);
    assert_eq!(set("KUBE-NODE-PORT-TCP"), vec!["30080"]);
    assert_eq!(set("KUBE-IPVS-IPS"), vec!["10.96.0.10"]);
    assert!(set("CALYX-NO-ENDPOINTS").is_empty());
    assert_eq!(
        set("KUBE-LOOP-BACK"),
        vec![
            "10.244.1.2,tcp:8080,10.244.1.2",
            "10.244.2.2,tcp:8080,10.244.2.2"
        ]
    );
    // IPv6 names as kube-proxy's, within ipset's 31 characters.
    assert_eq!(set_name(CLUSTER_IP, IpFamily::V6), "KUBE-6-CLUSTER-IP");
    assert_eq!(
        set_name(LOAD_BALANCER_SOURCE_CIDR, IpFamily::V6),
        "KUBE-6-LOAD-BALANCER-SOURCE-CID"
    );
    // A LoadBalancer with source ranges, one of them a single address, spelled as
    // `ipset save` prints it (no /32), so a restart finds nothing to change.
    let mut st = web_state(&[]);
    let key = st.services.keys().next().unwrap().clone();
    let mut svc = (*st.services[&key]).clone();
    svc.load_balancer_ips = vec!["198.51.100.201".parse().unwrap()];
    svc.load_balancer_source_ranges = vec![
        "192.0.2.0/24".parse().unwrap(),
        "192.0.2.100/32".parse().unwrap(),
    ];
    st.services.insert(key, std::sync::Arc::new(svc));
    let lb = desired(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &node());
    let lb_set = |name: &str| {
        lb.sets
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.entries.iter().cloned().collect::<Vec<_>>())
            .unwrap()
    };
    assert_eq!(
        lb_set("KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        vec![
            "198.51.100.201,tcp:80,192.0.2.0/24",
            "198.51.100.201,tcp:80,192.0.2.100"
        ]
    );
    assert_eq!(
        lb_set("KUBE-LOAD-BALANCER-FW"),
        vec!["198.51.100.201,tcp:80"]
    );
    assert_eq!(
        lb_set("CALYX-NO-ENDPOINTS"),
        vec!["10.96.0.10,tcp:80", "198.51.100.201,tcp:80"]
    );
    assert!(SETS
        .iter()
        .all(|(n, _)| set_name(n, IpFamily::V6).len() <= 31));
    assert_eq!(set_name(NO_ENDPOINTS, IpFamily::V6), "CALYX-6-NO-ENDPOINTS");
}

#[test]
fn a_removed_server_drains_and_goes_once_its_connections_end() {
    let ipvs_fake = Arc::new(RecordingIpvs::new());
    let addresses = Arc::new(FakeAddresses::default());
    let backends = IpvsBackends {
        ipvs: Box::new(ipvs_fake.clone()),
        ipset: Box::new(RecordingIpset::new()),
        addresses: Box::new(addresses.clone()),
    };
    let iptables = RecordingIptables::new();
    let mut rules = RulesetSync::new(ownership());
    let mut sync = IpvsSync::new(Duration::from_secs(600));
    let mut run = |sync: &mut IpvsSync, endpoints: &[&str], reread: bool| {
        let plans = port_plans(&web_state(endpoints), "n1", IpFamily::V4);
        let want = desired(&plans, IpFamily::V4, &node());
        sync.sync(
            &backends,
            &mut rules,
            &iptables,
            &want,
            IpvsScope::Full { reread },
        )
        .unwrap()
    };
    let vip = id("10.96.0.10:80");
    let b2: SocketAddr = "10.244.2.2:8080".parse().unwrap();
    assert!(run(&mut sync, &["10.244.1.2", "10.244.2.2"], true) > 0);
    assert_eq!(addresses.held().unwrap().unwrap().len(), 1);
    ipvs_fake.set_connections(&vip, &b2, 1, 0);
    run(&mut sync, &["10.244.1.2"], false);
    let held = ipvs_fake.services();
    assert_eq!(held[&vip].servers[&b2].weight, 0, "drained, not cut");
    assert_eq!(sync.draining(), 2, "the ClusterIP's and the NodePort's");
    // Nothing changed: nothing written, the server stays.
    ipvs_fake.take_written();
    run(&mut sync, &["10.244.1.2"], false);
    assert!(ipvs_fake.take_written().is_empty());
    // A restarted agent finds it at weight 0 and keeps draining it.
    let mut restarted = IpvsSync::new(Duration::from_secs(600));
    run(&mut restarted, &["10.244.1.2"], true);
    assert!(ipvs_fake.services()[&vip].servers.contains_key(&b2));
    // Its connection ends: the next look removes it (the NodePort's had none).
    ipvs_fake.set_connections(&vip, &b2, 0, 0);
    assert_eq!(restarted.sweep(&backends).unwrap(), 2);
    assert!(!ipvs_fake.services()[&vip].servers.contains_key(&b2));
    // The Service goes: its virtual services and address go at once.
    let plans: Vec<PortPlan> = Vec::new();
    let want = desired(&plans, IpFamily::V4, &node());
    restarted
        .sync(
            &backends,
            &mut rules,
            &iptables,
            &want,
            IpvsScope::Full { reread: false },
        )
        .unwrap();
    assert!(ipvs_fake.services().is_empty());
    assert!(addresses.held().unwrap().unwrap().is_empty());
}

#[test]
fn foreign_virtual_services_are_never_touched() {
    let fake = RecordingIpvs::new();
    let foreign = id("192.0.2.11:8080");
    ipvs::Backend::apply(
        &fake,
        &[ipvs::Op::AddService(
            foreign,
            ServiceSettings {
                scheduler: "wrr".into(),
                persistence: None,
                scheduler_flags: 0,
            },
        )],
    )
    .unwrap();
    let backends = IpvsBackends {
        ipvs: Box::new(fake),
        ipset: Box::new(RecordingIpset::new()),
        addresses: Box::new(Arc::new(FakeAddresses::default())),
    };
    let mut sync = IpvsSync::new(Duration::from_secs(600));
    let want = desired(&[], IpFamily::V4, &node());
    sync.sync(
        &backends,
        &mut RulesetSync::new(ownership()),
        &RecordingIptables::new(),
        &want,
        IpvsScope::Full { reread: true },
    )
    .unwrap();
    assert!(backends.ipvs.dump().unwrap().contains_key(&foreign));
}

#[test]
fn conn_reuse_mode_follows_the_kernel_as_kube_proxy_sets_it() {
    let reuse = |release| {
        sysctls(release)
            .into_iter()
            .find(|(k, _)| *k == "net.ipv4.vs.conn_reuse_mode")
            .map(|(_, v)| v)
    };
    assert_eq!(reuse("4.0.9"), None);
    assert_eq!(reuse("5.4.0-150-generic"), Some("0"));
    assert_eq!(reuse("6.1.0-57-amd64"), Some("1"));
    assert!(sysctls("6.1.0").contains(&("net.ipv4.vs.conntrack", "1")));
}
