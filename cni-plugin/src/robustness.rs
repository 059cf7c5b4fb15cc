//! Property tests of everything the plugin parses from outside (the network config,
//! CNI_ARGS, CNI_IFNAME, prevResult): whatever the input, no panic, and every error
//! carries the spec's code for that input. A fixed number of cases keeps CI's time
//! bounded; PROPTEST_CASES raises it for a longer hunt.

use proptest::prelude::*;
use serde_json::{json, Value};

use calyx_dataplane::validate_ifname;

use crate::config::{parse_cni_args, NetConf};
use crate::error::Code;
use crate::result::CniOutput;

const WORDS: &[&str] = &[
    "1.0.0",
    "0.3.1",
    "1.1.0",
    "0.2.0",
    "calyx",
    "bridge",
    "10.244.0.0/16",
    "fd00::/56",
    "10.0.0.0/33",
    "file:///tmp/calyx-fuzz-store",
    "file://relative/x",
    "etcd://h:1",
    "etcd://",
    "eth0",
    "eth%d",
    "169.254.1.1",
    "0.0.0.0/0",
    "10.0.0.1/32",
    "",
    "../../x",
    "node-1",
];

const KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "datastore",
    "nodeName",
    "mtu",
    "ipam",
    "pools",
    "blockSize",
    "blockSizeV6",
    "prevResult",
    "interfaces",
    "ips",
    "routes",
    "address",
    "gateway",
    "interface",
    "dst",
    "gw",
    "mac",
    "sandbox",
    "dns",
    "cni.dev/valid-attachments",
    "containerID",
    "ifname",
    "logLevel",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u32>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[ -~]{0,12}".prop_map(Value::String),
        prop::sample::select(WORDS).prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..7).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// A config that looks like a real one, with any field replaced by anything.
fn network_config() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec((prop::sample::select(KEYS), json_value()), 0..8),
        any::<bool>(),
    )
        .prop_map(|(fields, base)| {
            let mut conf = if base {
                json!({"cniVersion": "1.0.0", "name": "n", "type": "calyx",
                       "ipam": {"pools": ["10.244.0.0/16"]}})
            } else {
                json!({})
            };
            for (k, v) in fields {
                conf[k] = v;
            }
            conf
        })
}

fn config_codes_hold(stdin: &[u8]) {
    match NetConf::parse(stdin) {
        Err(e) => assert!(
            matches!(e.code, Code::Decode | Code::InvalidConfig),
            "parse: {e}"
        ),
        Ok(conf) => {
            if let Err(e) = conf.version() {
                assert_eq!(e.code, Code::IncompatibleVersion, "{e}");
            }
            if let Err(e) = conf.validate() {
                assert_eq!(e.code, Code::InvalidConfig, "{e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_bytes_as_config_give_code_6_or_7(stdin in prop::collection::vec(any::<u8>(), 0..200)) {
        config_codes_hold(&stdin);
    }

    #[test]
    fn any_json_config_gives_spec_codes(conf in network_config()) {
        config_codes_hold(conf.to_string().as_bytes());
    }

    #[test]
    fn any_cni_args_parse_or_give_code_4(text in "[ -~]{0,60}") {
        if let Err(e) = parse_cni_args(&text) {
            prop_assert_eq!(e.code, Code::InvalidEnvironment);
        }
        let _ = validate_ifname(&text);
    }

    #[test]
    fn any_prev_result_decodes_or_gives_code_7(prev in json_value()) {
        if let Err(e) = CniOutput::from_json(&prev) {
            prop_assert_eq!(e.code, Code::InvalidConfig);
            prop_assert!(e.msg.starts_with("prevResult"), "{}", e.msg);
        }
    }
}
