//! Every bad input gets the right CNI error code and a message naming what is wrong,
//! and leaves nothing behind: no veth, no route, no allocation, nothing in the pod.

mod common;

use common::{privileged, Call, Lab};
use serde_json::json;

fn expect_error(lab: &Lab, pod: &str, call: Call, code: u64, mentions: &str) {
    assert!(!call.ok, "expected failure, got {}", call.stdout);
    assert_eq!(call.code(), code, "{}", call.stdout);
    let msg = call.stdout["msg"].as_str().unwrap();
    assert!(
        msg.contains(mentions),
        "message {msg:?} should mention {mentions:?}"
    );
    assert!(call.stdout["cniVersion"].is_string());
    lab.assert_clean();
    assert_eq!(
        lab.pod_links(pod),
        Vec::<String>::new(),
        "pod was left half-configured"
    );
}

#[test]
fn malformed_json_is_code_6() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let netns = format!("/run/netns/{pod}");
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let call = lab.cni_raw(&env, br#"{"cniVersion": "1.0.0", "type": "calyx""#);
    expect_error(&lab, &pod, call, 6, "not valid JSON");
}

#[test]
fn missing_environment_is_code_4() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({})).to_string();
    let netns = format!("/run/netns/{pod}");
    let full = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_COMMAND"] {
        let env: Vec<(&str, &str)> = full
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        let call = lab.cni_raw(&env, conf.as_bytes());
        expect_error(&lab, &pod, call, 4, missing);
    }
}

#[test]
fn unsupported_cni_version_is_code_1() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({"cniVersion": "0.2.0"}));
    let call = lab.cni("ADD", &conf, "c", Some(&pod));
    expect_error(&lab, &pod, call, 1, "0.2.0");
}

#[test]
fn bad_netns_path_is_code_3() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({}));
    let call = lab.cni("ADD", &conf, "c", Some("cyxt-no-such-namespace"));
    expect_error(&lab, &pod, call, 3, "cyxt-no-such-namespace");
}

#[test]
fn ifname_over_15_chars_is_code_4() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let netns = format!("/run/netns/{pod}");
    let conf = lab.conf(json!({})).to_string();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "this-name-is-too-long"),
    ];
    let call = lab.cni_raw(&env, conf.as_bytes());
    expect_error(&lab, &pod, call, 4, "CNI_IFNAME");
}

#[test]
fn bad_config_value_is_code_7_naming_the_field() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({"ipam": {"pools": ["10.244.0.0/16"], "blockSize": "big"}}));
    let call = lab.cni("ADD", &conf, "c", Some(&pod));
    expect_error(&lab, &pod, call, 7, "ipam.blockSize");
}

#[test]
fn exhausted_pool_is_code_100_and_keeps_existing_pods() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    // A /30 pool in /30 blocks: four addresses in all.
    let conf = lab.conf(json!({"ipam": {"pools": ["10.250.0.0/30"], "blockSize": 30}}));
    let mut pods = Vec::new();
    for i in 0..4 {
        let pod = lab.pod();
        lab.add(&conf, &format!("p{i}"), &pod);
        pods.push(pod);
    }
    let extra = lab.pod();
    let call = lab.cni("ADD", &conf, "p4", Some(&extra));
    assert!(!call.ok);
    assert_eq!(call.code(), 100, "{}", call.stdout);
    assert!(call.stdout["msg"]
        .as_str()
        .unwrap()
        .contains("10.250.0.0/30"));
    assert_eq!(lab.pod_links(&extra), Vec::<String>::new());
    assert_eq!(lab.host_veths().len(), 4);
    assert_eq!(lab.allocated_count(), 4);
    for (i, pod) in pods.iter().enumerate() {
        lab.del(&conf, &format!("p{i}"), Some(pod));
    }
    lab.assert_clean();
}

#[test]
fn unwritable_store_is_code_11_and_status_50() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let ro = lab.dir.path().join("ro");
    lab.read_only_dir(&ro);
    let store = format!("file://{}/store", ro.display());
    let conf = lab.conf(json!({"cniVersion": "1.1.0", "datastore": store}));
    let call = lab.cni("ADD", &conf, "c", Some(&pod));
    expect_error(&lab, &pod, call, 11, "ro/store");
    let status = lab.cni_raw(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes());
    assert!(!status.ok);
    assert_eq!(status.code(), 50, "{}", status.stdout);
}

#[test]
fn unreachable_etcd_is_code_11_within_5_seconds_naming_the_endpoints() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let Some(mut etcd) = calyx_e2e::etcd::Etcd::start_in(Some(&lab.node), "127.0.0.1") else {
        return;
    };
    let pod = lab.pod();
    let conf = lab.conf(json!({"datastore": etcd.url()}));
    etcd.stop();
    let started = std::time::Instant::now();
    let call = lab.cni("ADD", &conf, "c", Some(&pod));
    let elapsed = started.elapsed();
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "ADD took {elapsed:?}"
    );
    expect_error(
        &lab,
        &pod,
        call,
        11,
        &format!("127.0.0.1:{}", etcd.client_port),
    );
}
