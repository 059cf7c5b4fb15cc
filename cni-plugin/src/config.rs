//! The network configuration (a conflist's plugin entry, as the runtime passes it on
//! stdin) and the CNI_* environment. Everything is validated here, before any side
//! effect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::Deserialize;

use crate::error::{CniError, CniResult, Code};
use crate::version::CniVersion;
use calyx_dataplane::validate_ifname;
use calyx_ipam::model::{validate_node_name, Pool};
use calyx_ipam::store::{self, Store, StoreError};

pub const DEFAULT_DATASTORE: &str = "file:///var/lib/calyx/store";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/calyx";
pub const DEFAULT_MTU: u32 = 1450;
/// The MTUs the plugin accepts, from the config or the agent's `mtu` file.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=65535;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: Option<String>,
    pub datastore: Option<String>,
    pub node_name: Option<String>,
    pub mtu: Option<u32>,
    /// Where the agent leaves `nodename` and `mtu` for the plugin.
    pub state_dir: Option<PathBuf>,
    /// Set by `calyx-agent install-cni`: until the agent has registered this node and
    /// left its state, ADD fails with code 11 (try again later) instead of claiming
    /// blocks for a node the cluster does not know, with a guessed MTU.
    #[serde(default)]
    pub require_agent: bool,
    #[serde(default)]
    pub ipam: IpamConf,
    pub dns: Option<serde_json::Value>,
    pub log_level: Option<String>,
    pub log_file: Option<PathBuf>,
    pub prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    #[serde(default)]
    pub pools: Vec<IpNetwork>,
    /// Block prefix length for IPv4 pools (default 26).
    pub block_size: Option<u8>,
    /// Block prefix length for IPv6 pools (default 122).
    pub block_size_v6: Option<u8>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin; a syntax error is code 6, a field of the wrong shape code 7 with
    /// the field's path.
    pub fn parse(stdin: &[u8]) -> CniResult<NetConf> {
        match serde_json::from_slice::<serde_json::Value>(stdin) {
            Err(e) => {
                return Err(CniError::new(
                    Code::Decode,
                    format!("network config on stdin is not valid JSON: {e}"),
                ))
            }
            // serde would read a list as the struct's fields in order.
            Ok(value) if !value.is_object() => {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    "network config on stdin must be a JSON object",
                ))
            }
            Ok(_) => {}
        }
        let mut de = serde_json::Deserializer::from_slice(stdin);
        let conf: NetConf = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            CniError::new(
                Code::InvalidConfig,
                format!("network config field {}: {}", e.path(), e.inner()),
            )
        })?;
        Ok(conf)
    }

    pub fn version(&self) -> CniResult<CniVersion> {
        match &self.cni_version {
            Some(v) => CniVersion::parse(v),
            None => Err(CniError::new(
                Code::IncompatibleVersion,
                "network config has no cniVersion",
            )),
        }
    }

    /// Checks the fields every command needs.
    pub fn validate(&self) -> CniResult<()> {
        let invalid = |msg: String| Err(CniError::new(Code::InvalidConfig, msg));
        match self.plugin_type.as_deref() {
            Some("calyx") => {}
            Some(other) => {
                return invalid(format!(
                    "network config field type: {other:?} is not \"calyx\""
                ))
            }
            None => return invalid("network config field type is missing".into()),
        }
        if self.name.is_empty() {
            return invalid("network config field name is missing".into());
        }
        if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return invalid(format!(
                "network config field name: {:?} may hold only letters, digits, '-', '_' and '.'",
                self.name
            ));
        }
        if self.name == calyx_ipam::model::TUNNEL_NETWORK {
            return invalid(format!(
                "network config field name: {:?} is reserved for the nodes' tunnel addresses",
                self.name
            ));
        }
        if let Some(mtu) = self.mtu {
            if !MTU_RANGE.contains(&mtu) {
                return invalid(format!(
                    "network config field mtu: {mtu} is outside 576..65535"
                ));
            }
        }
        if let Some(node) = &self.node_name {
            validate_node_name(node).map_err(|why| {
                CniError::new(
                    Code::InvalidConfig,
                    format!("network config field nodeName: {node:?} {why}"),
                )
            })?;
        }
        self.pools()?;
        self.open_store()?;
        Ok(())
    }

    /// The pools the config lists, with block sizes applied; no two may overlap.
    pub fn pools(&self) -> CniResult<Vec<Pool>> {
        let pools = calyx_ipam::model::pools_from_cidrs(
            &self.ipam.pools,
            self.ipam.block_size,
            self.ipam.block_size_v6,
        )
        .map_err(|e| {
            CniError::new(
                Code::InvalidConfig,
                format!("network config field ipam.pools {e}"),
            )
        })?;
        for (i, pool) in pools.iter().enumerate() {
            if let Some(earlier) = pools[..i].iter().find(|p| p.overlaps(&pool.cidr)) {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!(
                        "network config field ipam.pools: {} overlaps {}",
                        pool.cidr, earlier.cidr
                    ),
                ));
            }
        }
        Ok(pools)
    }

    pub fn datastore(&self) -> &str {
        self.datastore.as_deref().unwrap_or(DEFAULT_DATASTORE)
    }

    /// The store the `datastore` URL names (opening connects to nothing yet); a bad
    /// URL is code 7 naming the field.
    pub fn open_store(&self) -> CniResult<Box<dyn Store>> {
        store::open(self.datastore()).map_err(|e| match e {
            StoreError::BadUrl { .. } => CniError::new(
                Code::InvalidConfig,
                format!("network config field datastore: {e}"),
            ),
            other => other.into(),
        })
    }

    fn state_dir(&self) -> &Path {
        self.state_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_STATE_DIR))
    }

    /// The lock the plugin processes of this node take turns on for IPAM writes.
    pub fn ipam_lock_path(&self) -> PathBuf {
        self.state_dir().join("ipam.lock")
    }

    /// The lock ADD, DEL and GC of one attachment take turns on, so that a DEL never
    /// releases an address while an ADD is still wiring it (and ADD never wires an
    /// address a DEL released).
    pub fn attachment_lock_path(&self, handle_id: &str) -> PathBuf {
        use sha1::{Digest, Sha1};
        let name = hex::encode(Sha1::digest(handle_id.as_bytes()));
        self.state_dir()
            .join("attachments")
            .join(format!("{name}.lock"))
    }

    /// Where the plugin remembers its node's blocks between calls.
    pub fn known_blocks_path(&self) -> PathBuf {
        self.state_dir().join("ipam-known-blocks.json")
    }

    /// Whether the agent said some NetworkPolicy of `namespace` could isolate a new
    /// pod there. No file (no agent yet, or policy off) or no namespace (not a
    /// Kubernetes pod): no. A file that cannot be read holds the pod: fail closed.
    pub fn policy_may_isolate(&self, namespace: Option<&str>) -> bool {
        let Some(namespace) = namespace else {
            return false;
        };
        let path = self
            .state_dir()
            .join(calyx_dataplane::POLICY_NAMESPACES_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.lines().any(|line| line == namespace),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the policy namespaces; holding the pod until the agent classifies it");
                true
            }
        }
    }

    /// The agent's state file `name`, which must exist when `requireAgent` is set.
    fn agent_state(&self, name: &str) -> CniResult<Option<String>> {
        let path = self.state_dir().join(name);
        match read_trimmed(&path) {
            None if self.require_agent => Err(CniError::new(
                Code::TryAgainLater,
                format!(
                    "calyx-agent has not registered this node yet (no {}): \
                     the pod is retried once the agent is running",
                    path.display()
                ),
            )),
            found => Ok(found),
        }
    }

    /// nodeName from the config, else what the agent wrote, else the hostname. With
    /// `requireAgent`, the agent must have registered that same name.
    pub fn resolve_node_name(&self) -> CniResult<String> {
        if let Some(name) = self.node_name.as_ref().filter(|_| !self.require_agent) {
            return Ok(name.clone());
        }
        let path = self.state_dir().join("nodename");
        let registered = self.agent_state("nodename")?;
        if let Some(name) = &self.node_name {
            // requireAgent: agent_state returned the registered name or failed.
            if let Some(registered) = registered {
                if registered != *name {
                    return Err(CniError::new(
                        Code::InvalidConfig,
                        format!(
                            "network config nodeName {name:?} is not the node the agent \
                             registered ({registered:?} in {})",
                            path.display()
                        ),
                    ));
                }
            }
            return Ok(name.clone());
        }
        if let Some(name) = registered {
            validate_node_name(&name).map_err(|why| {
                CniError::new(
                    Code::InvalidConfig,
                    format!("{}: {name:?} {why}", path.display()),
                )
            })?;
            return Ok(name);
        }
        read_trimmed(Path::new("/proc/sys/kernel/hostname")).ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "cannot tell the node name: set nodeName",
            )
        })
    }

    /// mtu from the config, else what the agent wrote, else 1450.
    pub fn resolve_mtu(&self) -> CniResult<u32> {
        if let Some(mtu) = self.mtu {
            return Ok(mtu);
        }
        let path = self.state_dir().join("mtu");
        match self.agent_state("mtu")? {
            Some(text) => match text.parse::<u32>() {
                Ok(mtu) if MTU_RANGE.contains(&mtu) => Ok(mtu),
                _ => Err(CniError::new(
                    Code::InvalidConfig,
                    format!("{}: {text:?} is not an MTU in 576..65535", path.display()),
                )),
            },
            None => Ok(DEFAULT_MTU),
        }
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// The CNI_* environment of one call.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: BTreeMap<String, String>,
}

impl CniEnv {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> CniResult<CniEnv> {
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = nonempty("CNI_COMMAND")
            .ok_or_else(|| CniError::new(Code::InvalidEnvironment, "CNI_COMMAND is not set"))?;
        let args = match nonempty("CNI_ARGS") {
            Some(text) => parse_cni_args(&text)?,
            None => BTreeMap::new(),
        };
        Ok(CniEnv {
            command,
            container_id: nonempty("CNI_CONTAINERID"),
            netns: nonempty("CNI_NETNS").map(PathBuf::from),
            ifname: nonempty("CNI_IFNAME"),
            args,
        })
    }

    pub fn container_id(&self) -> CniResult<&str> {
        let id = self
            .container_id
            .as_deref()
            .ok_or_else(|| CniError::new(Code::InvalidEnvironment, "CNI_CONTAINERID is not set"))?;
        let ok = id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok || id.starts_with(['-', '.']) {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_CONTAINERID {id:?} may hold only letters, digits, '_', '.' and '-'"),
            ));
        }
        Ok(id)
    }

    pub fn ifname(&self) -> CniResult<&str> {
        let name = self
            .ifname
            .as_deref()
            .ok_or_else(|| CniError::new(Code::InvalidEnvironment, "CNI_IFNAME is not set"))?;
        validate_ifname(name).map_err(|why| {
            CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_IFNAME {name:?}: {why}"),
            )
        })?;
        Ok(name)
    }

    pub fn netns(&self) -> CniResult<&Path> {
        self.netns
            .as_deref()
            .ok_or_else(|| CniError::new(Code::InvalidEnvironment, "CNI_NETNS is not set"))
    }

    pub fn pod_namespace(&self) -> Option<&str> {
        self.args.get("K8S_POD_NAMESPACE").map(String::as_str)
    }

    pub fn pod_name(&self) -> Option<&str> {
        self.args.get("K8S_POD_NAME").map(String::as_str)
    }
}

/// `K=V;K=V` pairs. Unknown keys are ignored: runtimes add their own.
pub fn parse_cni_args(text: &str) -> CniResult<BTreeMap<String, String>> {
    let mut args = BTreeMap::new();
    for pair in text.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            ));
        };
        args.insert(key.to_string(), value.to_string());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"calyx","datastore":"file:///tmp/s",
                "nodeName":"node-1","mtu":1400,"dns":{"nameservers":["10.96.0.10"]},
                "ipam":{"pools":["10.244.0.0/16","fd00:10:244::/56"],"blockSize":24}}"#,
        )
        .unwrap();
        conf.validate().unwrap();
        assert_eq!(conf.datastore(), "file:///tmp/s");
        assert_eq!(conf.resolve_node_name().unwrap(), "node-1");
        assert_eq!(conf.resolve_mtu().unwrap(), 1400);
        let pools = conf.pools().unwrap();
        assert_eq!((pools[0].block_size, pools[1].block_size), (24, 122));
    }

    #[test]
    fn minimal_config_uses_defaults() {
        let conf = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"n","type":"calyx"}"#).unwrap();
        conf.validate().unwrap();
        assert_eq!(conf.datastore(), DEFAULT_DATASTORE);
        assert!(conf.pools().unwrap().is_empty());
    }

    #[test]
    fn a_config_that_is_no_object_is_code_7() {
        let err = NetConf::parse(br#"["1.0.0", "n", "calyx"]"#).unwrap_err();
        assert_eq!(err.code, Code::InvalidConfig);
        assert!(err.msg.contains("JSON object"), "{}", err.msg);
    }

    #[test]
    fn malformed_json_is_code_6() {
        let err = NetConf::parse(b"{\"cniVersion\":").unwrap_err();
        assert_eq!(err.code, Code::Decode);
    }

    #[test]
    fn wrong_field_shape_is_code_7_and_names_the_field() {
        let err =
            NetConf::parse(br#"{"type":"calyx","ipam":{"pools":["10.0.0.0/33"]}}"#).unwrap_err();
        assert_eq!(err.code, Code::InvalidConfig);
        assert!(err.msg.contains("ipam.pools[0]"), "{}", err.msg);
        let err = NetConf::parse(br#"{"type":"calyx","mtu":"big"}"#).unwrap_err();
        assert!(err.msg.contains("field mtu"), "{}", err.msg);
    }

    #[test]
    fn bad_values_are_code_7_and_name_the_field() {
        for (json, field) in [
            (r#"{"name":"n","type":"bridge"}"#, "type"),
            (r#"{"name":"n","type":"calyx","mtu":70000}"#, "mtu"),
            (
                r#"{"name":"n","type":"calyx","ipam":{"pools":["10.0.0.0/16"],"blockSize":12}}"#,
                "ipam.pools",
            ),
            (r#"{"type":"calyx"}"#, "name"),
            (r#"{"name":"n","type":"calyx","nodeName":""}"#, "nodeName"),
            (r#"{"name":"vxlan-tunnel-addr","type":"calyx"}"#, "reserved"),
            (
                r#"{"name":"n","type":"calyx","nodeName":"../../x"}"#,
                "nodeName",
            ),
            (
                r#"{"name":"n","type":"calyx","ipam":{"pools":["10.0.0.0/16","10.0.0.0/16"]}}"#,
                "ipam.pools",
            ),
            (
                r#"{"name":"n","type":"calyx","ipam":{"pools":["10.0.0.0/16","10.0.1.0/24"]}}"#,
                "overlaps",
            ),
            (
                r#"{"name":"n","type":"calyx","datastore":"file://relative/x"}"#,
                "field datastore",
            ),
            (
                r#"{"name":"n","type":"calyx","datastore":"/var/lib/calyx/store"}"#,
                "field datastore",
            ),
            (
                r#"{"name":"n","type":"calyx","datastore":"etcd://"}"#,
                "field datastore",
            ),
            (
                r#"{"name":"n","type":"calyx","datastore":"etcd://ETCD_HOST:2379"}"#,
                "placeholder",
            ),
        ] {
            let err = NetConf::parse(json.as_bytes())
                .unwrap()
                .validate()
                .unwrap_err();
            assert_eq!(err.code, Code::InvalidConfig, "{json}");
            assert!(err.msg.contains(field), "{json}: {}", err.msg);
        }
    }

    #[test]
    fn with_require_agent_add_waits_for_the_agent_to_register_the_same_node() {
        let dir = tempfile::tempdir().unwrap();
        let conf = NetConf {
            state_dir: Some(dir.path().to_path_buf()),
            node_name: Some("node-1".into()),
            require_agent: true,
            ..Default::default()
        };
        for err in [
            conf.resolve_node_name().unwrap_err(),
            conf.resolve_mtu().unwrap_err(),
        ] {
            assert_eq!(err.code, Code::TryAgainLater);
            assert!(
                err.msg.contains("not registered this node yet"),
                "{}",
                err.msg
            );
        }
        std::fs::write(dir.path().join("nodename"), "node-1\n").unwrap();
        std::fs::write(dir.path().join("mtu"), "1400\n").unwrap();
        assert_eq!(conf.resolve_node_name().unwrap(), "node-1");
        assert_eq!(conf.resolve_mtu().unwrap(), 1400);
        std::fs::write(dir.path().join("nodename"), "node-2\n").unwrap();
        let err = conf.resolve_node_name().unwrap_err();
        assert_eq!(err.code, Code::InvalidConfig);
        assert!(err.msg.contains("node-2"), "{}", err.msg);
        // Without it (a runtime test, a host without the agent), the old fallbacks hold.
        let dir = tempfile::tempdir().unwrap();
        let conf = NetConf {
            state_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        assert_eq!(conf.resolve_mtu().unwrap(), DEFAULT_MTU);
        assert!(conf.resolve_node_name().is_ok());
    }

    #[test]
    fn pods_are_held_only_in_the_namespaces_the_agent_names() {
        let dir = tempfile::tempdir().unwrap();
        let conf = NetConf {
            state_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        // No agent (or policy off): nobody is held.
        assert!(!conf.policy_may_isolate(Some("shop")));
        let file = dir.path().join(calyx_dataplane::POLICY_NAMESPACES_FILE);
        std::fs::write(&file, "shop\nbank\n").unwrap();
        assert!(conf.policy_may_isolate(Some("shop")));
        assert!(conf.policy_may_isolate(Some("bank")));
        assert!(!conf.policy_may_isolate(Some("sho")));
        assert!(!conf.policy_may_isolate(None), "not a Kubernetes pod");
        // A file that cannot be read: fail closed.
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        assert!(conf.policy_may_isolate(Some("web")));
    }

    #[test]
    fn an_mtu_file_out_of_range_is_code_7_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf = NetConf {
            state_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        for bad in ["0", "70000", "big"] {
            std::fs::write(dir.path().join("mtu"), bad).unwrap();
            let err = conf.resolve_mtu().unwrap_err();
            assert_eq!(err.code, Code::InvalidConfig);
            assert!(err.msg.contains("mtu"), "{}", err.msg);
        }
        std::fs::write(dir.path().join("mtu"), "1400\n").unwrap();
        assert_eq!(conf.resolve_mtu().unwrap(), 1400);
    }

    #[test]
    fn cni_args_parse_and_reject_garbage() {
        let args =
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0").unwrap();
        assert_eq!(args["K8S_POD_NAME"], "web-0");
        assert_eq!(
            parse_cni_args("oops").unwrap_err().code,
            Code::InvalidEnvironment
        );
    }

    #[test]
    fn missing_environment_is_code_4() {
        let env = CniEnv::from_vars(|k| (k == "CNI_COMMAND").then(|| "ADD".to_string())).unwrap();
        assert_eq!(
            env.container_id().unwrap_err().code,
            Code::InvalidEnvironment
        );
        assert_eq!(env.ifname().unwrap_err().code, Code::InvalidEnvironment);
        assert_eq!(env.netns().unwrap_err().code, Code::InvalidEnvironment);
        assert!(CniEnv::from_vars(|_| None).is_err());
    }
}
