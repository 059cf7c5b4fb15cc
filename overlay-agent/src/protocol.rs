//! The transport protocols Services and NetworkPolicies name, shared by the proxy and
//! the policy controller (neither imports the other).

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// As nft and iptables spell it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// As the Kubernetes API spells it, TCP when absent; Err: the message for an
    /// unknown one.
    pub fn from_api(value: Option<&str>) -> Result<Protocol, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!("{other:?} is not TCP, UDP or SCTP")),
        }
    }
}
