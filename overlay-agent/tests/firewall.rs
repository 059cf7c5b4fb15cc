//! The firewall layer against the kernel, in a namespace of its own: element changes
//! written over netlink read back through `nft` exactly as `nft -f` would have written
//! them (so a restart plans nothing), and a refused batch changes nothing.

use std::path::Path;

use calyx_dataplane::firewall::nft::{
    Backend, Chain, NftCommand, Set, SetKind, Table, TableSync, Touched,
};
use calyx_dataplane::firewall::IpFamily;
use calyx_e2e::lab::{must, privileged, sh};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.0]);
    }
}

/// A fresh network namespace (deleted when the first value drops), opened.
fn namespace(prefix: &str) -> (Netns, netns_rs::NetNs) {
    let ns = Netns(format!("{prefix}{}", std::process::id()));
    must("ip", &["netns", "add", &ns.0]);
    let netns =
        calyx_dataplane::netlink::open_namespace(Path::new(&format!("/run/netns/{}", ns.0)))
            .expect("open the namespace");
    (ns, netns)
}

fn map(declaration: &str, elements: &[(&str, &str)]) -> Set {
    let mut map = Set::new(SetKind::Map, declaration);
    for (k, v) in elements {
        map.insert(*k, Some(v.to_string()));
    }
    map
}

/// A table shaped like the proxy's: an endpoint map, an address map, a hairpin set.
fn table(lb: &[(&str, &str)], ips: &[(&str, &str)]) -> Table {
    let mut t = Table::new(IpFamily::V4, "calyx-test");
    t.chains
        .insert("lb".into(), Chain::new(vec!["counter".into()]));
    t.sets.insert(
        "service-lb-2".into(),
        map(
            "typeof ip daddr . meta l4proto . th dport . numgen random mod 2 : ip daddr . th dport;",
            lb,
        ),
    );
    t.sets.insert(
        "service-ips".into(),
        map("type ipv4_addr . inet_proto . inet_service : verdict;", ips),
    );
    let mut pairs = Set::new(SetKind::Set, "type ipv4_addr . ipv4_addr;");
    pairs.insert("10.244.1.2 . 10.244.1.2", None);
    t.sets.insert("hairpin".into(), pairs);
    t
}

/// The kernel's endpoint map holds what `wanted` has.
fn endpoints_as_in(wanted: &Table) {
    let listed = NftCommand
        .dump(IpFamily::V4.into(), "calyx-test")
        .unwrap()
        .expect("the table");
    assert_eq!(
        listed.sets["service-lb-2"].elements,
        wanted.sets["service-lb-2"].elements
    );
}

#[test]
fn element_changes_over_netlink_read_back_as_nft_writes_them() {
    if !privileged() {
        return;
    }
    let (_ns, netns) = namespace("cyxfw");
    netns
        .run(|_| {
            let before = table(
                &[
                    ("10.96.0.10 . tcp . 80 . 0", "10.244.1.2 . 8080"),
                    ("10.96.0.10 . tcp . 80 . 1", "10.244.2.2 . 8080"),
                ],
                &[("10.96.0.10 . tcp . 80", "goto lb")],
            );
            let mut sync = TableSync::new();
            sync.sync(&NftCommand, &before, true)
                .expect("first write, nft -f");
            // An endpoint change: two map elements replaced, one verdict added.
            let after = table(
                &[
                    ("10.96.0.10 . tcp . 80 . 0", "10.244.1.2 . 8080"),
                    ("10.96.0.10 . tcp . 80 . 1", "10.244.3.7 . 9090"),
                ],
                &[
                    ("10.96.0.10 . tcp . 80", "goto lb"),
                    ("10.96.0.11 . udp . 53", "drop"),
                ],
            );
            let mut touched = Touched::default();
            for (set, key) in [
                ("service-lb-2", "10.96.0.10 . tcp . 80 . 1"),
                ("service-ips", "10.96.0.11 . udp . 53"),
            ] {
                touched.elements.insert((set.to_string(), key.to_string()));
            }
            let tx = sync
                .sync_touched(&NftCommand, &after, &touched)
                .expect("element change over netlink");
            assert_eq!(tx.ops.len(), 3, "{}", tx.script());
            // Read back by nft: what a restart sees equals what was wanted.
            let again = TableSync::new()
                .sync(&NftCommand, &after, true)
                .expect("re-read");
            assert!(again.is_empty(), "the kernel differs: {}", again.script());
            endpoints_as_in(&after);

            // A batch the kernel refuses (a verdict to a chain that does not exist)
            // fails whole: the other element in the batch is not added either.
            let mut bad = after.clone();
            bad.sets
                .get_mut("service-ips")
                .unwrap()
                .insert("10.96.0.12 . tcp . 443", Some("goto nowhere".into()));
            bad.sets.get_mut("service-lb-2").unwrap().insert(
                "10.96.0.12 . tcp . 443 . 0",
                Some("10.244.1.2 . 8443".into()),
            );
            let mut touched = Touched::default();
            touched
                .elements
                .insert(("service-lb-2".into(), "10.96.0.12 . tcp . 443 . 0".into()));
            touched
                .elements
                .insert(("service-ips".into(), "10.96.0.12 . tcp . 443".into()));
            let err = sync
                .sync_touched(&NftCommand, &bad, &touched)
                .expect_err("a goto to no chain is refused");
            assert!(
                err.to_string().contains("netlink"),
                "not written over netlink: {err}"
            );
            endpoints_as_in(&after);
        })
        .expect("run in the namespace");
}

/// The iptables backend is the one the host's other components use (kube-proxy's
/// iptables-wrapper rule): nft on a fresh host, legacy once legacy holds more rules
/// (a kind node image that switched to it), nft again when kubelet marked nft.
#[test]
fn the_iptables_backend_follows_the_hosts_rules() {
    use calyx_dataplane::firewall::iptables::Variant;
    if !privileged() {
        return;
    }
    let (ns, netns) = namespace("cyxipt");
    let exec = |args: &[&str]| {
        let mut all = vec!["netns", "exec", ns.0.as_str()];
        all.extend_from_slice(args);
        must("ip", &all);
    };
    let detect = || netns.run(|_| Variant::detect()).unwrap();
    assert_eq!(detect(), Variant::Nft, "a fresh host");
    exec(&[
        "iptables-legacy",
        "-A",
        "FORWARD",
        "-s",
        "10.1.0.0/16",
        "-j",
        "DROP",
    ]);
    assert_eq!(detect(), Variant::Legacy, "legacy holds the host's rules");
    exec(&["iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    assert_eq!(detect(), Variant::Nft, "kubelet's hint names nft");
}
