//! Sysctls under /proc/sys. Network sysctls are per network namespace: they act on the
//! namespace of the thread that opens the file.

use std::fs;

use crate::{DataplaneError, Result};

/// Writes `value` to a sysctl given in dotted form (`net.ipv4.conf.eth0.proxy_arp`).
/// Interface names may contain dots, so pass them through `iface` separately.
pub fn set(key: &str, value: &str) -> Result<()> {
    let path = path_of(key);
    fs::write(&path, value).map_err(|source| DataplaneError::Io {
        op: format!("set sysctl {key}={value} ({path})"),
        source,
    })
}

/// `net.ipv4.conf.<iface>.<leaf>` with an interface name that may contain dots.
pub fn iface_key(family_tree: &str, iface: &str, leaf: &str) -> String {
    // /proc/sys uses '/' where the dotted form has '.', and keeps dots in names as
    // they are; mark the interface's dots so path_of leaves them alone.
    format!("{family_tree}.{}.{leaf}", iface.replace('.', "\u{0}"))
}

fn path_of(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/").replace('\u{0}', "."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_dots_survive_the_path_conversion() {
        let key = iface_key("net.ipv4.conf", "vxlan.calyx", "forwarding");
        assert_eq!(
            path_of(&key),
            "/proc/sys/net/ipv4/conf/vxlan.calyx/forwarding"
        );
        assert_eq!(
            path_of("net.ipv4.ip_forward"),
            "/proc/sys/net/ipv4/ip_forward"
        );
    }
}
