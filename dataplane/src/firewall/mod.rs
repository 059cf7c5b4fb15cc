//! The firewall layer: typed rule sets that Calyx owns, written to the kernel as ONE
//! transaction per apply (`nft -f -`, `iptables-restore --noflush`), a dump of what the
//! kernel holds to diff against, and recording fakes for tests.
//!
//! The callers (the agent's overlay pool rules and its service proxy) compute the rule
//! set they want as data; `plan` compares it with what the kernel (or the last apply)
//! holds and emits only the difference. Nothing here knows about pools or Services.
//!
//! Only the agent uses this module (cargo feature `firewall`), so the CNI binary
//! carries none of it.

pub mod ipset;
pub mod ipset_netlink;
pub mod iptables;
pub mod nft;

use std::fmt;

/// IPv4 or IPv6: one nftables table / one iptables binary each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const BOTH: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// The nftables family keyword.
    pub fn nft(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }

    pub fn iptables(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        }
    }

    pub fn of(ip: std::net::IpAddr) -> IpFamily {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The tool ran and refused the transaction; nothing of it took effect.
    #[error("{tool} refused the transaction: {stderr}")]
    Refused { tool: String, stderr: String },
    #[error("run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    /// A dump that could not be read back.
    #[error("read {what}: {why}")]
    Dump { what: String, why: String },
}

/// A short stable digest of some text (hex of SHA-1, 16 digits): recorded in the
/// kernel beside a chain or set, so a restarted agent can tell an unchanged object
/// without parsing rules back.
pub(crate) fn digest(text: &str) -> String {
    use sha1::{Digest, Sha1};
    let mut hex = hex::encode(Sha1::digest(text.as_bytes()));
    hex.truncate(16);
    hex
}

/// Runs `tool args` with `input` on stdin; stdout on success.
pub(crate) fn run_tool(
    tool: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, FirewallError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| FirewallError::Spawn {
            tool: tool.to_string(),
            source,
        })?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped");
        // A tool that fails early closes its stdin; its stderr says why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| FirewallError::Spawn {
            tool: tool.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(FirewallError::Refused {
            tool: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
