//! Connection-tracking entries deleted with the `conntrack` tool (conntrack-tools), in
//! the calling thread's network namespace.

use std::net::IpAddr;

/// Which UDP flows to delete: every given field must match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UdpFlows {
    /// The original destination address.
    pub orig_dst: Option<IpAddr>,
    /// The original destination port.
    pub orig_dst_port: u16,
    /// The address the flow was DNATed to.
    pub dst_nat: Option<IpAddr>,
}

impl UdpFlows {
    /// The `conntrack` arguments (`-f ipv6` when an address given is IPv6; with no
    /// address, both families' flows match).
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["-D", "-p", "udp"].map(String::from).to_vec();
        if let Some(dst) = self.orig_dst {
            args.extend(["--orig-dst".into(), dst.to_string()]);
        }
        args.extend(["--orig-port-dst".into(), self.orig_dst_port.to_string()]);
        if let Some(nat) = self.dst_nat {
            args.extend(["--dst-nat".into(), nat.to_string()]);
        }
        if let Some(ip) = self.orig_dst.or(self.dst_nat) {
            args.extend([
                "-f".into(),
                if ip.is_ipv6() { "ipv6" } else { "ipv4" }.into(),
            ]);
        }
        args
    }
}

/// Deletes each set of flows; a failure is logged and the others are still deleted
/// (a stale flow costs a client its next datagrams, not correctness of the rules).
pub fn delete_udp(flows: &[UdpFlows]) {
    for f in flows {
        let args = f.args();
        match std::process::Command::new("conntrack").args(&args).output() {
            // conntrack exits 1 when nothing matched.
            Ok(out) if out.status.success() || out.status.code() == Some(1) => {
                tracing::debug!(args = ?args, "conntrack entries deleted");
            }
            Ok(out) => tracing::warn!(
                args = ?args,
                error = %String::from_utf8_lossy(&out.stderr).trim(),
                "conntrack -D failed"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot run conntrack"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_each_field_and_the_family() {
        let to_endpoint = UdpFlows {
            orig_dst: Some("fd00:96::10".parse().unwrap()),
            orig_dst_port: 53,
            dst_nat: Some("fd00:10:244::2".parse().unwrap()),
        };
        assert_eq!(
            to_endpoint.args().join(" "),
            "-D -p udp --orig-dst fd00:96::10 --orig-port-dst 53 --dst-nat fd00:10:244::2 -f ipv6"
        );
        let node_port = UdpFlows {
            orig_dst: None,
            orig_dst_port: 30053,
            dst_nat: None,
        };
        assert_eq!(
            node_port.args().join(" "),
            "-D -p udp --orig-port-dst 30053"
        );
    }
}
