//! The ADD result, encoded in the version the runtime asked for, and the prevResult a
//! runtime hands back to CHECK, decoded from any of them.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{json, Map, Value};

use crate::error::{CniError, CniResult, Code};
use crate::version::CniVersion;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path for interfaces inside the container; None for host interfaces.
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct CniOutput {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Option<Value>,
}

impl CniOutput {
    pub fn to_json(&self, version: CniVersion) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut obj = json!({"name": i.name, "mac": i.mac});
                if let Some(sandbox) = &i.sandbox {
                    obj["sandbox"] = sandbox.clone().into();
                }
                obj
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut obj = Map::new();
                if version.ips_carry_version() {
                    let family = if ip.address.is_ipv4() { "4" } else { "6" };
                    obj.insert("version".into(), family.into());
                }
                obj.insert("address".into(), ip.address.to_string().into());
                if let Some(gw) = ip.gateway {
                    obj.insert("gateway".into(), gw.to_string().into());
                }
                if let Some(index) = ip.interface {
                    obj.insert("interface".into(), index.into());
                }
                Value::Object(obj)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut obj = json!({"dst": r.dst.to_string()});
                if let Some(gw) = r.gw {
                    obj["gw"] = gw.to_string().into();
                }
                obj
            })
            .collect();
        let mut out = json!({
            "cniVersion": version.as_str(),
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
        });
        if let Some(dns) = &self.dns {
            out["dns"] = dns.clone();
        }
        out
    }

    /// Decodes a prevResult of any supported version.
    pub fn from_json(value: &Value) -> CniResult<CniOutput> {
        let bad = |what: String| CniError::new(Code::InvalidConfig, format!("prevResult: {what}"));
        let str_field = |obj: &Value, key: &str, at: &str| -> CniResult<String> {
            obj.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("{at}.{key} is missing or not a string")))
        };
        if !value.is_object() {
            return Err(bad(format!("{value} is not a result object")));
        }
        for key in ["interfaces", "ips", "routes"] {
            if value.get(key).is_some_and(|v| !v.is_array()) {
                return Err(bad(format!("{key} is not a list")));
            }
        }
        let mut out = CniOutput::default();
        for (n, i) in array(value, "interfaces").iter().enumerate() {
            let at = format!("interfaces[{n}]");
            out.interfaces.push(Interface {
                name: str_field(i, "name", &at)?,
                mac: i
                    .get("mac")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                sandbox: i.get("sandbox").and_then(Value::as_str).map(str::to_string),
            });
        }
        for (n, ip) in array(value, "ips").iter().enumerate() {
            let at = format!("ips[{n}]");
            let address = str_field(ip, "address", &at)?;
            let address = address
                .parse()
                .map_err(|e| bad(format!("{at}.address {address:?}: {e}")))?;
            let gateway = match ip.get("gateway").and_then(Value::as_str) {
                Some(g) => Some(
                    g.parse()
                        .map_err(|e| bad(format!("{at}.gateway {g:?}: {e}")))?,
                ),
                None => None,
            };
            let interface = ip
                .get("interface")
                .and_then(Value::as_u64)
                .map(|i| i as usize);
            out.ips.push(IpConfig {
                address,
                gateway,
                interface,
            });
        }
        for (n, r) in array(value, "routes").iter().enumerate() {
            let at = format!("routes[{n}]");
            let dst = str_field(r, "dst", &at)?;
            let dst = dst
                .parse()
                .map_err(|e| bad(format!("{at}.dst {dst:?}: {e}")))?;
            let gw = match r.get("gw").and_then(Value::as_str) {
                Some(g) => Some(g.parse().map_err(|e| bad(format!("{at}.gw {g:?}: {e}")))?),
                None => None,
            };
            out.routes.push(Route { dst, gw });
        }
        out.dns = value.get("dns").cloned();
        Ok(out)
    }
}

fn array<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniOutput {
        CniOutput {
            interfaces: vec![
                Interface {
                    name: "cyx0123456789a".into(),
                    mac: "ee:ee:ee:ee:ee:ee".into(),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    sandbox: Some("/var/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.0.5/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Some(json!({"nameservers": ["10.96.0.10"]})),
        }
    }

    #[test]
    fn old_versions_carry_ip_version_new_ones_do_not() {
        let old = sample().to_json(CniVersion::V0_3_1);
        assert_eq!(old["cniVersion"], "0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        let new = sample().to_json(CniVersion::V1_0_0);
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["ips"][0]["interface"], 1);
        assert_eq!(new["interfaces"][1]["sandbox"], "/var/run/netns/p");
        assert!(new["interfaces"][0].get("sandbox").is_none());
        assert_eq!(new["dns"]["nameservers"][0], "10.96.0.10");
    }

    #[test]
    fn results_round_trip_through_every_version() {
        for v in [
            CniVersion::V0_3_1,
            CniVersion::V0_4_0,
            CniVersion::V1_0_0,
            CniVersion::V1_1_0,
        ] {
            let decoded = CniOutput::from_json(&sample().to_json(v)).unwrap();
            assert_eq!(decoded, sample(), "{v:?}");
        }
    }

    #[test]
    fn prev_result_that_is_no_result_object_is_refused() {
        for garbage in [
            json!("garbage"),
            json!(42),
            json!([]),
            json!({"ips": "10.0.0.1"}),
        ] {
            let err = CniOutput::from_json(&garbage).unwrap_err();
            assert_eq!(err.code, Code::InvalidConfig, "{garbage}");
            assert!(err.msg.starts_with("prevResult"), "{}", err.msg);
        }
    }

    #[test]
    fn bad_prev_result_names_the_field() {
        let err = CniOutput::from_json(&json!({"ips": [{"address": "nope"}]})).unwrap_err();
        assert!(err.msg.contains("ips[0].address"), "{}", err.msg);
    }
}
