//! Hostile and broken input that once damaged a node or a pod: each test here failed
//! before its fix (issue 12 names them).

mod common;

use common::{must, privileged, Call, Lab};
use serde_json::{json, Value};

/// One plugin call with every CNI_* variable given.
fn call(
    lab: &Lab,
    command: &str,
    conf: &Value,
    container: &str,
    netns: &str,
    ifname: &str,
) -> Call {
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=test;K8S_POD_NAME={container}");
    lab.cni_raw(
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", args.as_str()),
        ],
        conf.to_string().as_bytes(),
    )
}

fn default_routes(netns: &str) -> String {
    must("ip", &["-n", netns, "route", "show", "default"])
}

#[test]
fn the_nodes_own_namespace_is_refused_and_keeps_its_default_route() {
    if !privileged() {
        return;
    }
    let lab = common::new_lab();
    must(
        "ip",
        &["-n", &lab.node, "route", "add", "default", "dev", "lo"],
    );
    let before = default_routes(&lab.node);
    let conf = lab.conf(json!({}));
    let node_netns = format!("/run/netns/{}", lab.node);
    let add = call(&lab, "ADD", &conf, "c", &node_netns, "eth0");
    assert!(
        !add.ok,
        "ADD into the node's namespace succeeded: {}",
        add.stdout
    );
    assert_eq!(add.code(), 4, "{}", add.stdout);
    let msg = add.stdout["msg"].as_str().unwrap();
    assert!(msg.contains("node's own network namespace"), "{msg}");
    let del = call(&lab, "DEL", &conf, "c", &node_netns, "eth0");
    assert!(del.ok, "{}", del.stdout);
    assert_eq!(default_routes(&lab.node), before);
    lab.assert_clean();
}

#[test]
fn a_file_that_is_no_namespace_is_named_as_such() {
    if !privileged() {
        return;
    }
    let lab = common::new_lab();
    let file = lab.dir.path().join("not-a-netns");
    std::fs::write(&file, "x").unwrap();
    let add = call(
        &lab,
        "ADD",
        &lab.conf(json!({})),
        "c",
        file.to_str().unwrap(),
        "eth0",
    );
    assert_eq!(add.code(), 4, "{}", add.stdout);
    assert!(
        add.stdout["msg"]
            .as_str()
            .unwrap()
            .contains("not a network namespace"),
        "{}",
        add.stdout
    );
    lab.assert_clean();
}

#[test]
fn a_relative_file_datastore_is_code_7_naming_the_field() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({"datastore": "file://relative/x"}));
    let add = lab.cni("ADD", &conf, "c", Some(&pod));
    assert_eq!(add.code(), 7, "{}", add.stdout);
    assert!(
        add.stdout["msg"]
            .as_str()
            .unwrap()
            .contains("field datastore"),
        "{}",
        add.stdout
    );
    assert!(!std::path::Path::new("/x").exists());
    assert_eq!(lab.pod_links(&pod), Vec::<String>::new());
}

#[test]
fn a_second_interface_leaves_the_first_ones_routes_alone() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let netns = format!("/run/netns/{pod}");
    let conf = lab.conf(json!({}));
    let eth0 = call(&lab, "ADD", &conf, "c", &netns, "eth0");
    assert!(eth0.ok, "{}", eth0.stdout);
    let before = default_routes(&pod);
    assert!(before.contains("dev eth0"), "{before}");

    let net1 = call(&lab, "ADD", &conf, "c", &netns, "net1");
    assert!(net1.ok, "{}", net1.stdout);
    assert_eq!(
        net1.stdout["routes"],
        json!([]),
        "net1 must not claim the default route"
    );
    assert_eq!(default_routes(&pod), before);
    for ip in net1.ips().iter().chain(eth0.ips().iter()) {
        assert!(lab.ping(&lab.node, ip), "node cannot reach {ip}");
    }
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = net1.stdout.clone();
    let check = call(&lab, "CHECK", &check_conf, "c", &netns, "net1");
    assert!(check.ok, "CHECK net1: {}", check.stdout);

    let del = call(&lab, "DEL", &conf, "c", &netns, "net1");
    assert!(del.ok, "{}", del.stdout);
    assert_eq!(default_routes(&pod), before);
    check_conf["prevResult"] = eth0.stdout.clone();
    let check = call(&lab, "CHECK", &check_conf, "c", &netns, "eth0");
    assert!(check.ok, "CHECK eth0 after DEL net1: {}", check.stdout);
    assert!(lab.ping(&lab.node, &eth0.ips()[0]));

    let del = call(&lab, "DEL", &conf, "c", &netns, "eth0");
    assert!(del.ok, "{}", del.stdout);
    lab.assert_clean();
}

#[test]
fn check_refuses_a_prev_result_that_is_no_result() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({}));
    lab.add(&conf, "c", &pod);
    for garbage in [json!("garbage"), json!(42), json!({})] {
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = garbage.clone();
        let check = lab.cni("CHECK", &check_conf, "c", Some(&pod));
        assert!(!check.ok, "CHECK passed with prevResult {garbage}");
        assert_eq!(check.code(), 7, "{garbage}: {}", check.stdout);
        assert!(
            check.stdout["msg"].as_str().unwrap().contains("prevResult"),
            "{}",
            check.stdout
        );
    }
    lab.del(&conf, "c", Some(&pod));
    lab.assert_clean();
}

#[test]
fn attachments_whose_names_join_alike_get_their_own_handle_and_veth() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let conf = lab.conf(json!({}));
    let (first, second) = (lab.pod(), lab.pod());
    let a = call(
        &lab,
        "ADD",
        &conf,
        "pod.a",
        &format!("/run/netns/{first}"),
        "net1",
    );
    assert!(a.ok, "{}", a.stdout);
    let b = call(
        &lab,
        "ADD",
        &conf,
        "pod",
        &format!("/run/netns/{second}"),
        "a.net1",
    );
    assert!(b.ok, "{}", b.stdout);
    assert_ne!(a.ips(), b.ips());
    assert_eq!(lab.store_keys("handles/").len(), 2);
    assert_eq!(lab.host_veths().len(), 2);
    for ip in a.ips().iter().chain(b.ips().iter()) {
        assert!(lab.ping(&lab.node, ip), "node cannot reach {ip}");
    }
    for (container, pod, ifname) in [("pod.a", &first, "net1"), ("pod", &second, "a.net1")] {
        let del = call(
            &lab,
            "DEL",
            &conf,
            container,
            &format!("/run/netns/{pod}"),
            ifname,
        );
        assert!(del.ok, "{}", del.stdout);
    }
    lab.assert_clean();
}

/// ADD and DEL of one attachment racing each other end either with the pod wired and
/// its address held, or with nothing: never a veth routing an address that was
/// released (the next pod would get it too).
#[test]
fn concurrent_add_and_del_of_one_attachment_converge() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let conf = lab.conf(json!({}));
    for round in 0..60 {
        let pod = lab.pod();
        let container = format!("race{round}");
        // DEL starts a little later each round, to land inside ADD's steps.
        let delay = std::time::Duration::from_micros(500 * (round % 20));
        std::thread::scope(|s| {
            s.spawn(|| lab.cni("ADD", &conf, &container, Some(&pod)));
            s.spawn(|| {
                std::thread::sleep(delay);
                lab.cni("DEL", &conf, &container, Some(&pod))
            });
        });
        let held: Vec<String> = lab
            .store_keys("handles/")
            .iter()
            .flat_map(|(_, h)| h["addresses"].as_array().cloned().unwrap_or_default())
            .map(|a| a["ip"].as_str().unwrap().to_string())
            .collect();
        for route in lab.host_routes() {
            let ip = route.split(['/', ' ']).next().unwrap().to_string();
            assert!(
                held.contains(&ip),
                "round {round}: host route {route:?} leads to an address no handle holds ({held:?})"
            );
        }
        lab.del(&conf, &container, Some(&pod));
        lab.assert_clean();
    }
}
