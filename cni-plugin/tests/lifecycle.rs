//! ADD / CHECK / DEL / GC on real namespaces, with real packets.

mod common;

use common::{privileged, NODE_V4, NODE_V6};
use serde_json::{json, Value};

fn with_prev_result(conf: &Value, result: &Value) -> Value {
    let mut conf = conf.clone();
    conf["prevResult"] = result.clone();
    conf
}

/// ADD, then the node reaches the pod and back, CHECK passes, DEL cleans everything,
/// and a second DEL (no netns, as containerd sends it) succeeds too.
fn full_lifecycle(pools: Value, expect_v4: bool, expect_v6: bool) {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({"ipam": {"pools": pools}, "dns": {"nameservers": ["10.96.0.10"]}}));
    let add = lab.add(&conf, "c1", &pod);
    let ips = add.ips();
    assert_eq!(ips.iter().any(|ip| ip.contains('.')), expect_v4, "{ips:?}");
    assert_eq!(ips.iter().any(|ip| ip.contains(':')), expect_v6, "{ips:?}");
    assert_eq!(add.stdout["dns"]["nameservers"][0], "10.96.0.10");
    let interfaces = add.stdout["interfaces"].as_array().unwrap();
    assert_eq!(interfaces[0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert!(interfaces[0]["name"].as_str().unwrap().starts_with("cyx"));
    assert_eq!(interfaces[1]["name"], "eth0");
    assert_eq!(interfaces[1]["sandbox"], format!("/run/netns/{pod}"));
    assert_eq!(interfaces[1]["mac"].as_str().unwrap().len(), 17);

    for ip in &ips {
        assert!(lab.ping(&lab.node, ip), "node cannot reach pod {ip}");
        let node_ip = if ip.contains(':') { NODE_V6 } else { NODE_V4 };
        assert!(lab.ping(&pod, node_ip), "pod cannot reach node {node_ip}");
    }
    let mtu = common::must("ip", &["-n", &pod, "link", "show", "eth0"]);
    assert!(mtu.contains("mtu 1450"), "{mtu}");

    let check = lab.cni(
        "CHECK",
        &with_prev_result(&conf, &add.stdout),
        "c1",
        Some(&pod),
    );
    assert!(check.ok, "CHECK: {} {}", check.stdout, check.stderr);

    lab.del(&conf, "c1", Some(&pod));
    lab.assert_clean();
    assert_eq!(lab.pod_links(&pod), Vec::<String>::new());
    lab.del(&conf, "c1", Some(&pod));
    lab.del(&conf, "c1", None);
}

#[test]
fn ipv4_pod_lifecycle() {
    full_lifecycle(json!(["10.244.0.0/16"]), true, false);
}

#[test]
fn ipv6_pod_lifecycle() {
    full_lifecycle(json!(["fd00:10:244::/56"]), false, true);
}

#[test]
fn dual_stack_pod_lifecycle() {
    full_lifecycle(json!(["10.244.0.0/16", "fd00:10:244::/56"]), true, true);
}

#[test]
fn each_cni_version_gets_a_result_in_its_own_shape() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    for version in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let pod = lab.pod();
        let conf = lab.conf(json!({"cniVersion": version}));
        let add = lab.add(&conf, "v", &pod);
        assert_eq!(add.stdout["cniVersion"], version);
        let ip = &add.stdout["ips"][0];
        assert_eq!(
            ip.get("version").is_some(),
            version.starts_with('0'),
            "{version}: {ip}"
        );
        lab.del(&conf, "v", Some(&pod));
    }
    lab.assert_clean();
}

#[test]
fn check_names_what_differs() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({}));
    let add = lab.add(&conf, "c", &pod);
    common::must("ip", &["-n", &pod, "route", "del", "default"]);
    let check = lab.cni(
        "CHECK",
        &with_prev_result(&conf, &add.stdout),
        "c",
        Some(&pod),
    );
    assert!(!check.ok);
    assert_eq!(check.code(), 101);
    let msg = check.stdout["msg"].as_str().unwrap();
    assert!(msg.contains("0.0.0.0/0 via 169.254.1.1"), "{msg}");
    lab.del(&conf, "c", Some(&pod));
    lab.assert_clean();
}

#[test]
fn repeated_add_returns_the_same_address_and_allocates_once() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({}));
    let first = lab.add(&conf, "c", &pod).ips();
    let second = lab.add(&conf, "c", &pod).ips();
    assert_eq!(first, second);
    assert_eq!(lab.allocated_count(), 1);
    assert_eq!(lab.host_veths().len(), 1);
    assert!(lab.ping(&lab.node, &first[0]));
    lab.del(&conf, "c", Some(&pod));
    lab.assert_clean();
}

#[test]
fn del_succeeds_when_netns_or_veth_are_already_gone() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let conf = lab.conf(json!({}));

    // The veth is deleted behind the plugin's back.
    let pod = lab.pod();
    lab.add(&conf, "a", &pod);
    let veth = lab.host_veths().remove(0);
    common::must("ip", &["-n", &lab.node, "link", "del", &veth]);
    lab.del(&conf, "a", Some(&pod));
    lab.assert_clean();

    // The pod's namespace is gone (the kernel removes the veth with it).
    let pod = lab.pod();
    lab.add(&conf, "b", &pod);
    common::must("ip", &["netns", "del", &pod]);
    lab.del(&conf, "b", Some(&pod));
    lab.del(&conf, "b", None);
    lab.assert_clean();
}

#[test]
fn freed_addresses_are_not_reused_at_once() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({}));
    let first = lab.add(&conf, "a", &pod).ips();
    lab.del(&conf, "a", Some(&pod));
    let second = lab.add(&conf, "b", &pod).ips();
    assert_ne!(
        first, second,
        "a freed address was handed out again at once"
    );
    lab.del(&conf, "b", Some(&pod));
    lab.assert_clean();
}

#[test]
fn gc_releases_every_attachment_the_runtime_no_longer_lists() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let conf = lab.conf(json!({"cniVersion": "1.1.0"}));
    let pods: Vec<String> = (0..3).map(|_| lab.pod()).collect();
    let mut ips = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        ips.push(lab.add(&conf, &format!("gc{i}"), pod).ips());
    }
    let mut gc_conf = conf.clone();
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": "gc0", "ifname": "eth0"}]);
    let gc = lab.cni_raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        gc_conf.to_string().as_bytes(),
    );
    assert!(gc.ok, "GC: {} {}", gc.stdout, gc.stderr);
    assert_eq!(lab.allocated_count(), 1);
    assert_eq!(lab.host_veths().len(), 1);
    assert!(
        lab.ping(&lab.node, &ips[0][0]),
        "GC broke the attachment it had to keep"
    );
    lab.del(&conf, "gc0", Some(&pods[0]));
    lab.assert_clean();
}

#[test]
fn status_reports_ready_and_version_lists_all_versions() {
    if !privileged() {
        return;
    }
    let lab = common::new_lab();
    let conf = lab.conf(json!({"cniVersion": "1.1.0"}));
    let status = lab.cni_raw(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes());
    assert!(status.ok, "{} {}", status.stdout, status.stderr);
    let version = lab.cni_raw(
        &[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_CONTAINERID", "dummy"),
            ("CNI_NETNS", "dummy"),
        ],
        br#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(version.ok);
    assert_eq!(version.stdout["cniVersion"], "1.0.0");
    assert_eq!(
        version.stdout["supportedVersions"],
        json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

/// A pod recreated with the same name (a StatefulSet) gets a new sandbox while the old
/// one's DEL may still be on its way: the old DEL must not take the new pod's veth.
#[test]
fn late_del_of_an_old_sandbox_spares_the_new_pod_of_the_same_name() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let conf = lab.conf(json!({}));
    let (old_pod, new_pod) = (lab.pod(), lab.pod());
    let args = "K8S_POD_NAMESPACE=db;K8S_POD_NAME=web-0";
    let call = |cmd: &str, cid: &str, ns: &str| {
        let netns = format!("/run/netns/{ns}");
        lab.cni_raw(
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", args),
            ],
            conf.to_string().as_bytes(),
        )
    };
    assert!(call("ADD", "old", &old_pod).ok);
    let new = call("ADD", "new", &new_pod);
    assert!(new.ok, "{}", new.stdout);
    let del = call("DEL", "old", &old_pod);
    assert!(del.ok, "{}", del.stdout);
    assert_eq!(lab.host_veths().len(), 1);
    assert!(
        lab.ping(&lab.node, &new.ips()[0]),
        "old DEL broke the new pod"
    );
    assert_eq!(lab.allocated_count(), 1);
    assert!(call("DEL", "new", &new_pod).ok);
    lab.assert_clean();
}

#[test]
fn pod_lifecycle_on_etcd() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let Some(etcd) = calyx_e2e::etcd::Etcd::start_in(Some(&lab.node), "127.0.0.1") else {
        return;
    };
    let pod = lab.pod();
    let conf = lab.conf(
        json!({"datastore": etcd.url(), "ipam": {"pools": ["10.244.0.0/16", "fd00:10:244::/56"]}}),
    );
    let add = lab.add(&conf, "e1", &pod);
    let ips = add.ips();
    assert_eq!(ips.len(), 2, "{ips:?}");
    for ip in &ips {
        assert!(lab.ping(&lab.node, ip), "node cannot reach pod {ip}");
    }
    let again = lab.add(&conf, "e1", &pod);
    assert_eq!(
        add.stdout, again.stdout,
        "a repeated ADD must return the same result"
    );
    let check = lab.cni(
        "CHECK",
        &with_prev_result(&conf, &add.stdout),
        "e1",
        Some(&pod),
    );
    assert!(check.ok, "CHECK: {}", check.stdout);
    lab.del(&conf, "e1", Some(&pod));
    lab.del(&conf, "e1", None);
    assert_eq!(lab.host_veths(), Vec::<String>::new());
    assert_eq!(lab.host_routes(), Vec::<String>::new());
    let handles = etcd.keys("handles/");
    assert!(handles.is_empty(), "handles left in etcd: {handles:?}");
}
