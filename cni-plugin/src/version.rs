//! CNI versions Calyx speaks, and what each allows.

use crate::error::{CniError, CniResult, Code};

pub const SUPPORTED: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// What Calyx answers in when a request names no usable version.
pub const LATEST: &str = "1.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub fn parse(text: &str) -> CniResult<CniVersion> {
        match text {
            "0.3.1" => Ok(CniVersion::V0_3_1),
            "0.4.0" => Ok(CniVersion::V0_4_0),
            "1.0.0" => Ok(CniVersion::V1_0_0),
            "1.1.0" => Ok(CniVersion::V1_1_0),
            other => Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {other:?} is not supported; calyx supports {}",
                    SUPPORTED.join(", ")
                ),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Before 1.0.0, each result IP carried its family as `"version": "4"|"6"`.
    pub fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// CHECK came in 0.4.0; GC and STATUS in 1.1.0.
    pub fn require(self, command: &str) -> CniResult<()> {
        let minimum = match command {
            "CHECK" => CniVersion::V0_4_0,
            "GC" | "STATUS" => CniVersion::V1_1_0,
            _ => CniVersion::V0_3_1,
        };
        if self < minimum {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "{command} needs cniVersion {} or later; the config says {}",
                    minimum.as_str(),
                    self.as_str()
                ),
            ));
        }
        Ok(())
    }
}

/// The VERSION answer: the versions Calyx supports, in the version asked for.
/// The version an answer (an error included) is written in: the request's
/// `cniVersion` when Calyx speaks it, read from the raw JSON so that a config whose
/// other fields do not parse is still answered in its own version; else the latest.
pub fn answer_version(stdin: &[u8]) -> &'static str {
    let asked = serde_json::from_slice::<serde_json::Value>(stdin).ok();
    let asked = asked
        .as_ref()
        .and_then(|v| v.get("cniVersion"))
        .and_then(serde_json::Value::as_str);
    SUPPORTED
        .iter()
        .copied()
        .find(|v| Some(*v) == asked)
        .unwrap_or(LATEST)
}

pub fn version_info(asked: Option<&str>) -> serde_json::Value {
    let answer_in = asked.filter(|v| SUPPORTED.contains(v)).unwrap_or(LATEST);
    serde_json::json!({"cniVersion": answer_in, "supportedVersions": SUPPORTED})
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_are_answered_in_the_requested_version_even_when_the_config_is_bad() {
        assert_eq!(
            answer_version(br#"{"cniVersion":"1.0.0","mtu":"big"}"#),
            "1.0.0"
        );
        assert_eq!(answer_version(br#"{"cniVersion":"0.2.0"}"#), LATEST);
        assert_eq!(answer_version(b"not json"), LATEST);
    }

    use super::*;

    #[test]
    fn every_supported_version_parses_and_round_trips() {
        for v in SUPPORTED {
            assert_eq!(CniVersion::parse(v).unwrap().as_str(), v);
        }
    }

    #[test]
    fn unsupported_version_is_code_1_and_names_it() {
        let err = CniVersion::parse("0.2.0").unwrap_err();
        assert_eq!(err.code, Code::IncompatibleVersion);
        assert!(err.msg.contains("\"0.2.0\""), "{}", err.msg);
    }

    #[test]
    fn commands_are_gated_by_version() {
        assert!(CniVersion::V0_3_1.require("CHECK").is_err());
        assert!(CniVersion::V0_4_0.require("CHECK").is_ok());
        assert!(CniVersion::V1_0_0.require("GC").is_err());
        assert!(CniVersion::V1_1_0.require("STATUS").is_ok());
        assert!(CniVersion::V0_3_1.ips_carry_version());
        assert!(!CniVersion::V1_0_0.ips_carry_version());
    }

    #[test]
    fn version_answers_in_the_asked_version() {
        assert_eq!(version_info(Some("1.0.0"))["cniVersion"], "1.0.0");
        assert_eq!(version_info(Some("9.9.9"))["cniVersion"], LATEST);
        assert_eq!(
            version_info(None)["supportedVersions"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
    }
}
