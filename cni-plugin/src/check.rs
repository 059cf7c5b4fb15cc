//! CHECK's expectations: the plan of the pod's network as ADD made it, rebuilt from
//! the prevResult the runtime hands back. `PodNetwork::differences` then compares it
//! with what is observed.

use std::net::IpAddr;
use std::path::Path;

use crate::error::{CniError, CniResult, Code};
use crate::pod_network::{pod_mac, PodNetwork};
use crate::result::CniOutput;

/// The plan ADD applied for this attachment, as its result recorded it: the pod
/// interface, its addresses, and the families whose default route it carries (ADD
/// lists a default route in the result for exactly those).
pub fn plan_from_prev_result(
    prev: &CniOutput,
    host_veth: String,
    ifname: &str,
    netns: &Path,
    container_id: &str,
) -> CniResult<PodNetwork> {
    let bad = |what: String| CniError::new(Code::InvalidConfig, format!("prevResult: {what}"));
    let Some(index) = prev.interfaces.iter().position(|i| i.name == ifname) else {
        return Err(bad(format!("names no interface {ifname}")));
    };
    let addresses: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none_or(|i| i == index))
        .map(|ip| ip.address.ip())
        .collect();
    if addresses.is_empty() {
        return Err(bad(format!("lists no address of interface {ifname}")));
    }
    let default_route = |v4: bool| {
        prev.routes
            .iter()
            .any(|r| r.dst.prefix() == 0 && r.dst.is_ipv4() == v4)
    };
    Ok(PodNetwork {
        host_veth,
        ifname: ifname.to_string(),
        netns: netns.to_path_buf(),
        pod_mac: pod_mac(container_id, ifname),
        mtu: 0, // not compared: the plugin's MTU may have been changed since
        addresses,
        default_route_v4: default_route(true),
        default_route_v6: default_route(false),
        held: false, // not compared: the agent releases it
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prev(routes: serde_json::Value) -> CniOutput {
        CniOutput::from_json(&json!({
            "interfaces": [{"name": "cyx1"}, {"name": "net1", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.244.0.9/32", "interface": 1}],
            "routes": routes,
        }))
        .unwrap()
    }

    #[test]
    fn a_second_interface_without_default_route_expects_no_pod_routes() {
        let plan = plan_from_prev_result(
            &prev(json!([])),
            "cyx1".into(),
            "net1",
            Path::new("/p"),
            "c",
        )
        .unwrap();
        assert!(!plan.default_route_v4);
        assert!(plan.pod_routes(3).is_empty());
        assert_eq!(plan.host_routes(4).len(), 1);
        let plan = plan_from_prev_result(
            &prev(json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])),
            "cyx1".into(),
            "net1",
            Path::new("/p"),
            "c",
        )
        .unwrap();
        assert_eq!(plan.pod_routes(3).len(), 2);
    }

    #[test]
    fn prev_result_without_this_interface_or_its_addresses_is_refused() {
        let empty = CniOutput::from_json(&json!({})).unwrap();
        let err =
            plan_from_prev_result(&empty, "cyx1".into(), "eth0", Path::new("/p"), "c").unwrap_err();
        assert!(err.msg.contains("names no interface eth0"), "{}", err.msg);
        let err = plan_from_prev_result(
            &prev(json!([])),
            "cyx1".into(),
            "cyx1",
            Path::new("/p"),
            "c",
        )
        .unwrap_err();
        assert!(err.msg.contains("no address"), "{}", err.msg);
    }
}
