//! IPVS over generic netlink and ipsets through `ipset restore` and netlink, against a
//! real kernel in a network namespace of their own. The dev machines' kernel has no
//! IPVS: those tests run inside the VM (`make test-vm`), where a missing IPVS fails
//! them; the ipset-only one runs everywhere.
#![cfg(feature = "firewall")]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use calyx_dataplane::firewall::ipset::{self, Backend as _, IpsetCommand, IpsetSync, SetSpec};
use calyx_dataplane::firewall::IpFamily;
use calyx_dataplane::ipvs::{
    self, Backend as _, IpvsNetlink, Op, Protocol, RealServer, ServiceId, ServiceSettings,
    VirtualService,
};

fn ipvs_kernel() -> bool {
    let ok = std::path::Path::new("/proc/net/ip_vs").exists();
    if !ok {
        if std::env::var_os("CALYX_IN_VM").is_some() || std::env::var_os("CI").is_some() {
            panic!("IPVS test cannot run: this kernel has no IPVS (/proc/net/ip_vs)");
        }
        eprintln!("skipped: this kernel has no IPVS; run `make test-vm`");
    }
    ok
}

/// Runs `f` inside a fresh network namespace (IPVS state is per namespace), removed
/// afterwards.
fn in_new_netns(f: impl FnOnce()) {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "cyxipvs{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let ns = netns_rs::NetNs::new(&name).expect("a network namespace");
    // IPVS refuses real servers while the namespace has no local routing table yet
    // (EINVAL from inet_addr_type): loopback up makes one, as any node has.
    let result = ns.run(|_| {
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
    });
    let _ = ns.remove();
    if let Err(panic) = result.expect("entered the namespace") {
        std::panic::resume_unwind(panic);
    }
}

fn id(s: &str, protocol: Protocol) -> ServiceId {
    ServiceId {
        address: s.parse().unwrap(),
        protocol,
    }
}

fn settings(scheduler: &str, persistence: Option<u32>) -> ServiceSettings {
    ServiceSettings {
        scheduler: scheduler.into(),
        persistence,
        scheduler_flags: 0,
    }
}

fn rs(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
#[ignore = "needs IPVS: runs in the VM (make test-vm)"]
fn ipvs_services_and_servers_round_trip_through_the_kernel() {
    if !ipvs_kernel() {
        return;
    }
    in_new_netns(|| {
        let kernel = IpvsNetlink::open().expect("the IPVS family");
        assert!(kernel.dump().unwrap().is_empty());
        let web = id("10.96.0.10:80", Protocol::Tcp);
        let dns = id("[fd00:96::10]:53", Protocol::Udp);
        let mut want = ipvs::Services::new();
        let server = |weight| RealServer {
            weight,
            active: 0,
            inactive: 0,
        };
        want.insert(
            web,
            VirtualService {
                settings: settings("rr", None),
                servers: BTreeMap::from([
                    (rs("10.244.1.2:8080"), server(1)),
                    (rs("10.244.2.2:8080"), server(1)),
                ]),
            },
        );
        want.insert(
            dns,
            VirtualService {
                settings: settings("sh", Some(10800)),
                servers: BTreeMap::from([(rs("[fd00:244::2]:5353"), server(1))]),
            },
        );
        let ops = ipvs::plan(&kernel.dump().unwrap(), &want, |_| true);
        assert_eq!(ops.len(), 5);
        kernel.apply(&ops).unwrap();
        assert_eq!(kernel.dump().unwrap(), want);

        // A change: one server drained (weight 0), a scheduler changed, one removed.
        want.get_mut(&web)
            .unwrap()
            .servers
            .insert(rs("10.244.2.2:8080"), server(0));
        want.get_mut(&dns).unwrap().settings = settings("mh", None);
        let ops = ipvs::plan(&kernel.dump().unwrap(), &want, |_| true);
        assert_eq!(ops.len(), 2, "{ops:?}");
        kernel.apply(&ops).unwrap();
        assert_eq!(kernel.dump().unwrap(), want);

        // A refused op names its object; the others in the batch still apply.
        let err = kernel
            .apply(&[
                Op::AddService(web, settings("rr", None)),
                Op::DeleteServer(web, rs("10.244.1.2:8080")),
            ])
            .unwrap_err();
        assert!(
            err.to_string().contains("add service TCP 10.96.0.10:80"),
            "{err}"
        );
        assert_eq!(kernel.dump().unwrap()[&web].servers.len(), 1);
        // One service's servers alone (what draining reads), and a missing one.
        assert_eq!(
            kernel.servers(&web).unwrap(),
            kernel.dump().unwrap()[&web].servers
        );
        let missing = id("10.96.0.99:80", Protocol::Tcp);
        assert!(kernel.servers(&missing).unwrap().is_empty());

        // A start's worth of requests in one apply (more than one write of them, and
        // more acknowledgements than the default receive buffer holds at once).
        let mut many = ipvs::Services::new();
        for i in 0..1500u32 {
            let vip = format!("10.97.{}.{}:80", i / 250, i % 250 + 1);
            many.insert(
                id(&vip, Protocol::Tcp),
                VirtualService {
                    settings: settings("rr", None),
                    servers: BTreeMap::from([
                        (rs("10.244.1.2:8080"), server(1)),
                        (rs("10.244.2.2:8080"), server(1)),
                    ]),
                },
            );
        }
        let ops = ipvs::plan(&ipvs::Services::new(), &many, |_| true);
        assert_eq!(ops.len(), 4500);
        kernel.apply(&ops).unwrap();
        let held = kernel.dump().unwrap();
        assert_eq!(held.len(), 1500 + 2);
        kernel
            .apply(&ipvs::plan(&held, &ipvs::Services::new(), |s| {
                s.address.ip().to_string().starts_with("10.97.")
            }))
            .unwrap();

        // Foreign services are left alone by a plan that does not own them.
        let foreign = id("192.0.2.50:8080", Protocol::Tcp);
        kernel
            .apply(&[Op::AddService(foreign, settings("wrr", None))])
            .unwrap();
        let ops = ipvs::plan(&kernel.dump().unwrap(), &ipvs::Services::new(), |s| {
            *s != foreign
        });
        kernel.apply(&ops).unwrap();
        assert_eq!(
            kernel.dump().unwrap().keys().collect::<Vec<_>>(),
            vec![&foreign]
        );
    });
}

#[test]
#[ignore = "needs IPVS: runs in the VM (make test-vm)"]
fn ipsets_are_written_with_one_restore_and_read_back() {
    if !ipvs_kernel() {
        return;
    }
    in_new_netns(|| {
        fn owns(name: &str) -> bool {
            name.starts_with("CALYX-TEST-")
        }
        let mut cluster = SetSpec::new("CALYX-TEST-CIP", "hash:ip,port", IpFamily::V4);
        cluster.entries.insert("10.96.0.10,tcp:80".into());
        let mut v6 = SetSpec::new("CALYX-TEST-6-CIP", "hash:ip,port", IpFamily::V6);
        v6.entries.insert("fd00:96::10,udp:53".into());
        let mut ports = SetSpec::new("CALYX-TEST-NP", "bitmap:port", IpFamily::V4);
        ports.entries.insert("30080".into());
        let mut loopback = SetSpec::new("CALYX-TEST-LB", "hash:ip,port,ip", IpFamily::V4);
        loopback
            .entries
            .insert("10.244.1.2,tcp:8080,10.244.1.2".into());
        let mut ranges = SetSpec::new("CALYX-TEST-SRC", "hash:ip,port,net", IpFamily::V4);
        ranges
            .entries
            .insert("198.51.100.201,tcp:80,192.0.2.0/24".into());
        let want = vec![cluster, v6, ports, loopback, ranges];
        let mut sync = IpsetSync::new(owns);
        assert!(!sync.sync(&IpsetCommand, &want, true).unwrap().is_empty());
        // Read back from the kernel: identical, so nothing to write.
        let mut again = IpsetSync::new(owns);
        assert!(again.sync(&IpsetCommand, &want, true).unwrap().is_empty());
        let held = IpsetCommand.dump(owns).unwrap();
        assert_eq!(held.len(), 5);
        assert_eq!(
            ipset::plan(&held, &want, owns),
            vec![],
            "the kernel's spelling matches ours"
        );
        assert!(sync
            .sync(&IpsetCommand, &[], false)
            .unwrap()
            .iter()
            .any(|op| matches!(op, ipset::SetOp::Destroy(_))));
        assert!(IpsetCommand.dump(owns).unwrap().is_empty());
    });
}

/// ipset runs on the dev machines' kernel too: this one runs everywhere (as root).
#[test]
fn set_entries_written_over_netlink_read_back_as_the_tool_spells_them() {
    use calyx_dataplane::firewall::ipset_netlink::{self, EntryOp};
    in_new_netns(|| {
        fn owns(name: &str) -> bool {
            name.starts_with("CALYX-NL-")
        }
        let specs = [
            (
                "CALYX-NL-CIP",
                "hash:ip,port",
                IpFamily::V4,
                "10.96.0.10,tcp:80",
            ),
            (
                "CALYX-NL-6-CIP",
                "hash:ip,port",
                IpFamily::V6,
                "fd00:96::10,udp:53",
            ),
            ("CALYX-NL-NP", "bitmap:port", IpFamily::V4, "30080"),
            (
                "CALYX-NL-LB",
                "hash:ip,port,ip",
                IpFamily::V4,
                "10.244.1.2,sctp:8080,10.244.1.2",
            ),
            (
                "CALYX-NL-SRC",
                "hash:ip,port,net",
                IpFamily::V4,
                "198.51.100.201,tcp:80,192.0.2.0/24",
            ),
            (
                "CALYX-NL-SRC",
                "hash:ip,port,net",
                IpFamily::V4,
                "198.51.100.201,tcp:80,192.0.2.7",
            ),
            ("CALYX-NL-IPS", "hash:ip", IpFamily::V4, "10.96.0.10"),
            ("CALYX-NL-6-IPS", "hash:ip", IpFamily::V6, "fd00:96::10"),
        ];
        // The sets, empty, through the tool.
        let mut empty: Vec<SetSpec> = specs
            .iter()
            .map(|(name, kind, family, _)| SetSpec::new(*name, kind, *family))
            .collect();
        empty.dedup_by(|a, b| a.name == b.name);
        IpsetSync::new(owns)
            .sync(&IpsetCommand, &empty, true)
            .unwrap();
        let ops: Vec<EntryOp> = specs
            .iter()
            .map(|(set, _, _, entry)| EntryOp {
                add: true,
                set,
                entry,
            })
            .collect();
        let requests = ipset_netlink::encode(&ops).expect("every form known");
        ipset_netlink::send(&ops, &requests).expect("the kernel takes them");
        // Twice is fine, as with -exist.
        ipset_netlink::send(&ops, &requests).expect("already there is fine");
        let mut want = empty.clone();
        for (set, _, _, entry) in &specs {
            let spec = want.iter_mut().find(|s| s.name == *set).unwrap();
            spec.entries.insert(entry.to_string());
        }
        let held = IpsetCommand.dump(owns).unwrap();
        assert_eq!(ipset::plan(&held, &want, owns), vec![], "held: {held:?}");
        // Deleted again; and a delete of what is gone is fine.
        let dels: Vec<EntryOp> = ops.iter().map(|op| EntryOp { add: false, ..*op }).collect();
        for _ in 0..2 {
            ipset_netlink::send(&dels, &ipset_netlink::encode(&dels).unwrap()).unwrap();
        }
        assert!(IpsetCommand
            .dump(owns)
            .unwrap()
            .values()
            .all(|s| s.entries.is_empty()));
        // A refusal names the entry.
        let missing = [EntryOp {
            add: true,
            set: "CALYX-NL-GONE",
            entry: "10.0.0.1",
        }];
        let err = ipset_netlink::send(&missing, &ipset_netlink::encode(&missing).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("add CALYX-NL-GONE 10.0.0.1"), "{err}");
        // Through the backend: the run of entries goes over netlink, the rest to the tool.
        let add = |set: &str, entry: &str| ipset::SetOp::Add {
            set: set.into(),
            entry: entry.into(),
        };
        IpsetCommand
            .apply(&[
                add("CALYX-NL-CIP", "10.96.0.11,tcp:443"),
                ipset::SetOp::Create {
                    name: "CALYX-NL-X".into(),
                    kind: "hash:ip".into(),
                    options: "family inet".into(),
                },
                add("CALYX-NL-X", "10.0.0.9"),
            ])
            .unwrap();
        let held = IpsetCommand.dump(owns).unwrap();
        assert!(held["CALYX-NL-CIP"].entries.contains("10.96.0.11,tcp:443"));
        assert!(held["CALYX-NL-X"].entries.contains("10.0.0.9"));
        IpsetSync::new(owns).sync(&IpsetCommand, &[], true).unwrap();
    });
}

/// The device-address calls IPVS mode makes on kube-ipvs0, on a veth here (this
/// kernel has no dummy links; the VM test below makes one).
#[test]
fn device_addresses_are_added_read_and_removed_in_one_socket() {
    use calyx_dataplane::device_addresses::DeviceAddresses;
    in_new_netns(|| {
        let made = std::process::Command::new("ip")
            .args([
                "link", "add", "cyxdev0", "type", "veth", "peer", "name", "cyxdev1",
            ])
            .status();
        assert!(made.is_ok_and(|s| s.success()), "ip link add veth");
        let device = DeviceAddresses::open("cyxdev0").unwrap();
        let other = DeviceAddresses::open("cyxdev1").unwrap();
        assert_eq!(device.held().unwrap(), Some(Default::default()));
        let ips: Vec<std::net::IpAddr> = ["10.96.0.10", "10.96.0.11", "fd00:96::10"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        device.add(&ips).unwrap();
        other.add(&["192.0.2.7".parse().unwrap()]).unwrap();
        assert_eq!(
            device.held().unwrap().unwrap(),
            ips.iter().copied().collect()
        );
        // The node's addresses leave out the device's own and loopback.
        let all: Vec<ipnetwork::IpNetwork> =
            vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        assert_eq!(
            device.node_ips(&all).unwrap(),
            vec!["192.0.2.7".parse::<std::net::IpAddr>().unwrap()]
        );
        // One already gone is fine.
        device.remove(&ips[..2]).unwrap();
        device.remove(&ips[..2]).unwrap();
        assert_eq!(
            device.held().unwrap().unwrap(),
            [ips[2]].into_iter().collect()
        );
        device.remove_device().unwrap();
        device.remove_device().unwrap();
        assert_eq!(device.held().unwrap(), None);
        let error = device.add(&ips).unwrap_err();
        assert!(error.to_string().contains("cyxdev0"), "{error}");
    });
}

#[test]
#[ignore = "needs dummy links: runs in the VM (make test-vm)"]
fn a_dummy_device_is_created_once_and_holds_addresses() {
    use calyx_dataplane::device_addresses::DeviceAddresses;
    in_new_netns(|| {
        let device = DeviceAddresses::open("kube-ipvs0").unwrap();
        assert_eq!(device.held().unwrap(), None);
        device.create_dummy().unwrap();
        assert!(device.create_dummy().is_err(), "created twice");
        device.add(&["10.96.0.10".parse().unwrap()]).unwrap();
        assert_eq!(device.held().unwrap().unwrap().len(), 1);
        device.remove_device().unwrap();
        assert_eq!(device.held().unwrap(), None);
    });
}
