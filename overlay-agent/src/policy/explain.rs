//! `calyx-agent policy explain`: from the policy model alone, whether one flow is
//! allowed, which policy and rule allow each direction, or which pod is isolated and
//! by what. Reads the Pods, Namespaces and NetworkPolicies of `--services-dir`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::model::{Cluster, PodKey, Protocol};
use super::parse;
use super::verdict::{verdict, Allowed, Endpoint, Flow, Verdict};
use crate::object_files;

#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// The directory of Pod, Namespace and NetworkPolicy objects (YAML or JSON).
    #[arg(long, env = "CALYX_SERVICES_DIR")]
    pub services_dir: PathBuf,
    /// The source: NS/POD or an address.
    #[arg(long)]
    pub from: String,
    /// The destination: NS/POD:PORT or ADDRESS:PORT (IPv6 as [ADDRESS]:PORT),
    /// optionally followed by /tcp, /udp or /sctp (tcp when absent).
    #[arg(long)]
    pub to: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("--{flag} {value:?}: {why}")]
    Flag {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error("cannot read {dir}: {source}")]
    Dir { dir: String, source: std::io::Error },
}

/// Every Pod, Namespace and NetworkPolicy in `dir`; a bad file or object is named on
/// stderr and left out.
pub fn read_cluster(dir: &Path) -> Result<Cluster, ExplainError> {
    let files = object_files::list(dir).map_err(|source| ExplainError::Dir {
        dir: dir.display().to_string(),
        source,
    })?;
    let mut cluster = Cluster::default();
    for path in files {
        let items = match object_files::read(&path) {
            Ok(items) => items,
            Err(e) => {
                eprintln!("{}: skipped: {e}", path.display());
                continue;
            }
        };
        for item in items {
            let prefix = item.prefix();
            if let Err(what) = parse::object(item.value).map(|o| o.map(|o| cluster.add(o))) {
                eprintln!(
                    "{} document {}: {prefix}{what}: skipped",
                    path.display(),
                    item.document
                );
            }
        }
    }
    Ok(cluster)
}

/// `--from`/`--to` without the port: a pod by NS/POD, or an address (the pod holding
/// it when there is one).
fn endpoint<'a>(
    cluster: &'a Cluster,
    flag: &'static str,
    text: &str,
) -> Result<Endpoint<'a>, ExplainError> {
    let bad = |why: String| ExplainError::Flag {
        flag,
        value: text.to_string(),
        why,
    };
    if let Ok(address) = text.parse::<IpAddr>() {
        return Ok(
            match cluster
                .pods
                .values()
                .find(|p| p.addresses.contains(&address))
            {
                Some(pod) => Endpoint::pod(pod, address),
                None => Endpoint::address(address),
            },
        );
    }
    let Some((namespace, name)) = text.split_once('/') else {
        return Err(bad("neither NS/POD nor an address".into()));
    };
    let key = PodKey {
        namespace: namespace.into(),
        name: name.into(),
    };
    let pod = cluster
        .pods
        .get(&key)
        .ok_or_else(|| bad(format!("no pod {key} in the directory")))?;
    let address = *pod
        .addresses
        .first()
        .ok_or_else(|| bad(format!("pod {key} has no address yet")))?;
    Ok(Endpoint::pod(pod, address))
}

/// Splits `--to` into the endpoint text, port and protocol.
fn destination(text: &str) -> Result<(String, u16, Protocol), ExplainError> {
    let bad = |why: &str| ExplainError::Flag {
        flag: "to",
        value: text.to_string(),
        why: why.to_string(),
    };
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((rest, p @ ("tcp" | "udp" | "sctp"))) => (
            rest,
            parse::protocol("to", Some(&p.to_uppercase())).map_err(|_| bad("bad protocol"))?,
        ),
        _ => (text, Protocol::Tcp),
    };
    if let Ok(socket) = rest.parse::<SocketAddr>() {
        return Ok((socket.ip().to_string(), socket.port(), protocol));
    }
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| bad("needs a port (NS/POD:PORT or ADDRESS:PORT)"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad("the port is not 1-65535"))?;
    Ok((host.to_string(), port, protocol))
}

fn describe(endpoint: &Endpoint) -> String {
    match endpoint.pod {
        Some(pod) => format!("{} ({})", pod.key, endpoint.address),
        None => endpoint.address.to_string(),
    }
}

fn why_allowed(allowed: &Allowed, direction: &str, side: &Endpoint) -> String {
    let who = side
        .pod
        .map_or_else(|| side.address.to_string(), |p| p.key.to_string());
    match allowed {
        Allowed::NotIsolated if side.pod.is_none() => {
            format!("not a pod: no {direction} policy applies")
        }
        Allowed::NotIsolated => format!("{who} is not isolated for {direction}"),
        Allowed::ByRule { policy, rule } => {
            format!("allowed {direction} by {policy} ({direction}[{rule}])")
        }
        Allowed::ResidentNode => "the pod's own node always reaches it".into(),
        Allowed::Itself => "a pod reaching itself never leaves it".into(),
    }
}

/// One flow explained: whether it is allowed, as rows (label, text) and as JSON.
#[derive(Debug)]
pub struct Explanation {
    pub allowed: bool,
    pub rows: Vec<(&'static str, String)>,
    pub json: Value,
}

pub fn explain(cluster: &Cluster, from: &str, to: &str) -> Result<Explanation, ExplainError> {
    let (to_host, port, protocol) = destination(to)?;
    let flow = Flow {
        from: endpoint(cluster, "from", from)?,
        to: endpoint(cluster, "to", &to_host)?,
        protocol,
        port,
    };
    let mut rows = vec![
        ("from", describe(&flow.from)),
        (
            "to",
            format!("{} {}/{port}", describe(&flow.to), protocol.name()),
        ),
    ];
    let judged = verdict(cluster, &flow);
    let mut json = match &judged {
        Verdict::Allowed { egress, ingress } => {
            rows.push(("egress", why_allowed(egress, "egress", &flow.from)));
            rows.push(("ingress", why_allowed(ingress, "ingress", &flow.to)));
            rows.push(("verdict", "allowed".into()));
            json!({"verdict": "allowed", "egress": format!("{egress:?}"), "ingress": format!("{ingress:?}")})
        }
        Verdict::Denied {
            direction,
            pod,
            isolated_by,
        } => {
            let by: Vec<String> = isolated_by.iter().map(ToString::to_string).collect();
            let why = format!(
                "{pod} is isolated for {} by {} and no rule of theirs allows it",
                direction.name(),
                by.join(", ")
            );
            rows.push((direction.name(), why.clone()));
            rows.push(("verdict", "denied".into()));
            json!({"verdict": "denied", "direction": direction.name(), "pod": pod.to_string(),
                   "isolated_by": by, "why": why})
        }
    };
    json["from"] = json!(describe(&flow.from));
    json["to"] = json!(describe(&flow.to));
    json["protocol"] = json!(protocol.name());
    json["port"] = json!(port);
    Ok(Explanation {
        allowed: judged.is_allowed(),
        rows,
        json,
    })
}

/// Runs the command: prints the explanation; Ok(false) when the flow is denied.
pub fn run(args: &ExplainArgs) -> Result<bool, ExplainError> {
    let cluster = read_cluster(&args.services_dir)?;
    let Explanation {
        allowed,
        rows,
        json,
    } = explain(&cluster, &args.from, &args.to)?;
    match args.output {
        Output::Json => println!("{json:#}"),
        Output::Table => {
            for (label, text) in rows {
                println!("{label:<8} {text}");
            }
        }
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn explain_names_the_allowing_rule_and_the_isolating_policy() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |ns: &str, name: &str, ip: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: \"{name}\", namespace: \"{ns}\", labels: {{pod: \"{name}\"}}}}\nspec:\n  nodeName: n1\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: 8080}}]\nstatus:\n  podIPs: [{{ip: {ip}}}]\n---\n")
        };
        write(
            dir.path(),
            "pods.yaml",
            &format!(
                "{}{}{}",
                pod("x", "a", "10.244.1.1"),
                pod("x", "b", "10.244.1.2"),
                pod("y", "c", "10.244.2.1")
            ),
        );
        write(dir.path(), "ns.yaml", "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: x}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: \"y\", labels: {team: web}}}\n");
        write(dir.path(), "policy.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: web}}\n    ports: [{port: http}]\n");
        write(dir.path(), "broken.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: nonsense}}]\n");
        let cluster = read_cluster(dir.path()).unwrap();
        assert_eq!(cluster.policies.len(), 1, "the invalid policy is left out");
        let Explanation {
            allowed,
            rows,
            json,
        } = explain(&cluster, "y/c", "x/a:8080").unwrap();
        assert!(allowed);
        assert_eq!(json["verdict"], "allowed", "{rows:?}");
        assert!(
            rows.iter()
                .any(|(_, t)| t.contains("allowed ingress by x/allow-web (ingress[0])")),
            "{rows:?}"
        );
        let json = explain(&cluster, "x/b", "10.244.1.1:8080/tcp")
            .unwrap()
            .json;
        assert_eq!(json["verdict"], "denied");
        assert_eq!(json["pod"], "x/a");
        assert_eq!(json["isolated_by"], json!(["x/allow-web"]));
        let json = explain(&cluster, "y/c", "x/a:8080/udp").unwrap().json;
        assert_eq!(json["verdict"], "denied", "the named port is TCP");
        let json = explain(&cluster, "x/a", "y/c:80").unwrap().json;
        assert_eq!(json["verdict"], "allowed");
        let error = explain(&cluster, "x/zz", "y/c:80").unwrap_err();
        assert!(error.to_string().contains("--from \"x/zz\""), "{error}");
        let error = explain(&cluster, "x/a", "y/c").unwrap_err();
        assert!(error.to_string().contains("needs a port"), "{error}");
    }
}
