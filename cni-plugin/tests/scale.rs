//! Many pods at once and many pods over time on one node.

mod common;

use std::collections::BTreeSet;

use common::privileged;
use serde_json::json;

#[test]
fn hundred_parallel_adds_get_distinct_reachable_addresses() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let conf = lab.conf(json!({}));
    let pods: Vec<String> = (0..100).map(|_| lab.pod()).collect();
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (lab, conf) = (&lab, &conf);
                s.spawn(move || lab.add(conf, &format!("par{i}"), pod).ips().remove(0))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: BTreeSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 100, "duplicate addresses: {ips:?}");
    assert_eq!(lab.allocated_count(), 100);
    assert_eq!(lab.host_veths().len(), 100);
    let unreachable: Vec<&String> = std::thread::scope(|s| {
        let handles: Vec<_> = ips
            .iter()
            .map(|ip| {
                let lab = &lab;
                s.spawn(move || (!lab.ping(&lab.node, ip)).then_some(ip))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(unreachable.is_empty(), "unreachable pods: {unreachable:?}");
    for (i, pod) in pods.iter().enumerate() {
        lab.del(&conf, &format!("par{i}"), Some(pod));
    }
    lab.assert_clean();
}

#[test]
fn thousand_add_del_cycles_leave_nothing_behind() {
    if !privileged() {
        return;
    }
    let mut lab = common::new_lab();
    let pod = lab.pod();
    let conf = lab.conf(json!({"ipam": {"pools": ["10.244.0.0/16", "fd00:10:244::/56"]}}));
    for i in 0..1000 {
        let container = format!("cycle{i}");
        lab.add(&conf, &container, &pod);
        lab.del(&conf, &container, Some(&pod));
    }
    lab.assert_clean();
    assert_eq!(lab.pod_links(&pod), Vec::<String>::new());
}
