//! Services in the lab: backends that say who they are and whom they see, clients that
//! ask them through a Service address, and the Service and EndpointSlice objects the
//! agents read from their --services-dir (written as `kubectl get -o json` prints them).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::sockets::{connect_from, in_netns, listen_in};

/// The port every lab backend listens on (TCP and UDP, both families).
pub const BACKEND_PORT: u16 = 8080;

/// A TCP backend in `netns` on [::]:port: greets each connection with
/// "<name> <client address>\n", then echoes every line it gets, prefixed with its name.
pub fn tcp_backend(netns: &str, name: &str, port: u16) -> Result<()> {
    let listener = listen_in(netns, SocketAddr::from(([0u16; 8], port)))?;
    let name = name.to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let name = name.clone();
            std::thread::spawn(move || {
                let peer = conn.peer_addr().map(|p| p.ip().to_canonical());
                let Ok(peer) = peer else { return };
                if writeln!(conn, "{name} {peer}").is_err() {
                    return;
                }
                let Ok(reader) = conn.try_clone() else { return };
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(conn, "{name} {line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

/// A UDP backend in `netns` on [::]:port: answers each datagram with
/// "<name> <client address>".
pub fn udp_backend(netns: &str, name: &str, port: u16) -> Result<()> {
    let socket = in_netns(netns, move || {
        UdpSocket::bind(SocketAddr::from(([0u16; 8], port)))
    })?;
    let name = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let reply = format!("{name} {}", peer.ip().to_canonical());
            let _ = socket.send_to(reply.as_bytes(), peer);
        }
    });
    Ok(())
}

/// Who answered and whom it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub backend: String,
    pub seen: IpAddr,
}

fn parse_answer(line: &str) -> Result<Answer> {
    let (backend, seen) = line
        .trim()
        .split_once(' ')
        .with_context(|| format!("odd answer {line:?}"))?;
    Ok(Answer {
        backend: backend.to_string(),
        seen: seen
            .parse()
            .with_context(|| format!("odd answer {line:?}"))?,
    })
}

/// Connects from `netns` to `addr` and reads the greeting.
pub fn ask_tcp(netns: &str, addr: SocketAddr) -> Result<Answer> {
    let stream = connect_from(netns, addr)?;
    read_greeting(&stream)
}

/// `ask_tcp` giving up after `wait` (connect and greeting together).
pub fn ask_tcp_within(netns: &str, addr: SocketAddr, wait: Duration) -> Result<Answer> {
    let stream = in_netns(netns, move || TcpStream::connect_timeout(&addr, wait))?;
    stream.set_read_timeout(Some(wait))?;
    read_greeting(&stream)
}

pub fn read_greeting(stream: &TcpStream) -> Result<Answer> {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        bail!("connection closed without a greeting");
    }
    parse_answer(&line)
}

/// Sends one line on an open connection and reads the echo.
pub fn echo(stream: &mut TcpStream, text: &str) -> Result<String> {
    writeln!(stream, "{text}")?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Sends a datagram from `netns` (from `source_port`, 0 for any) to `addr` and waits
/// up to `wait` for the answer.
pub fn ask_udp(netns: &str, source_port: u16, addr: SocketAddr, wait: Duration) -> Result<Answer> {
    let bind: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], source_port))
    } else {
        SocketAddr::from(([0u16; 8], source_port))
    };
    let socket = in_netns(netns, move || UdpSocket::bind(bind))?;
    socket.set_read_timeout(Some(wait))?;
    socket.send_to(b"who", addr)?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf).context("no UDP answer")?;
    parse_answer(&String::from_utf8_lossy(&buf[..n]))
}

/// One endpoint of a slice.
#[derive(Debug, Clone)]
pub struct Ep {
    pub ip: String,
    pub node: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Ep {
    pub fn ready(ip: impl Into<String>, node: impl Into<String>) -> Ep {
        Ep {
            ip: ip.into(),
            node: node.into(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// Terminating but still serving (a pod in its grace period).
    pub fn terminating(ip: impl Into<String>, node: impl Into<String>) -> Ep {
        Ep {
            ready: false,
            terminating: true,
            ..Ep::ready(ip, node)
        }
    }
}

/// A Service object (v1) as the API prints it. `ports`: (name, protocol, port, nodePort).
pub fn service_object(
    name: &str,
    cluster_ips: &[&str],
    ports: &[(&str, &str, u16, Option<u16>)],
) -> Value {
    let node_ports = ports.iter().any(|p| p.3.is_some());
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "lab", "resourceVersion": "1"},
        "spec": {
            "type": if node_ports { "NodePort" } else { "ClusterIP" },
            "clusterIP": cluster_ips[0],
            "clusterIPs": cluster_ips,
            "ports": ports.iter().map(|(pname, proto, port, node_port)| {
                let mut p = json!({"name": pname, "protocol": proto, "port": port, "targetPort": pname});
                if let Some(np) = node_port {
                    p["nodePort"] = json!(np);
                }
                p
            }).collect::<Vec<_>>(),
            "sessionAffinity": "None",
            "externalTrafficPolicy": "Cluster",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}}
    })
}

/// EndpointSlices (one per family present) for `service` with `ports` (name,
/// protocol) all on BACKEND_PORT.
pub fn slice_objects(service: &str, ports: &[(&str, &str)], endpoints: &[Ep]) -> Vec<Value> {
    let mut out = Vec::new();
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let eps: Vec<Value> = endpoints
            .iter()
            .filter(|e| e.ip.contains(':') == v6)
            .map(|e| {
                json!({
                    "addresses": [e.ip],
                    "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                    "nodeName": e.node,
                })
            })
            .collect();
        if eps.is_empty() && v6 {
            continue;
        }
        out.push(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "addressType": family,
            "metadata": {
                "name": format!("{service}-{}", family.to_lowercase()),
                "namespace": "lab",
                "labels": {"kubernetes.io/service-name": service},
            },
            "ports": ports.iter().map(|(n, p)| json!({"name": n, "protocol": p, "port": BACKEND_PORT})).collect::<Vec<_>>(),
            "endpoints": eps,
        }));
    }
    out
}

/// Writes `objects` as one `kind: List` file, atomically (temp file + rename).
pub fn write_objects(dir: &Path, file: &str, objects: Vec<Value>) -> Result<()> {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?)?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}
