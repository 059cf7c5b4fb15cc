//! The CNI commands. Each validates its whole input before its first side effect.

use std::collections::BTreeSet;
use std::net::IpAddr;

use calyx_ipam::allocator::AllocationRequest;
use calyx_ipam::model::{handle_id, AllocationAttrs, Handle};
use calyx_ipam::store::Store;
use calyx_ipam::{exclusive_turn, remove_lock_file, unix_now, Ipam};
use serde_json::Value;

use crate::check::plan_from_prev_result;
use crate::config::{CniEnv, NetConf};
use crate::error::{CniError, CniResult, Code};
use crate::pod_network::{
    default_destination, gateway_for, host_veth_name, pod_address, PodNetwork,
};
use crate::result::{CniOutput, Interface, IpConfig, Route};
use crate::version::{version_info, CniVersion};
use crate::wiring::{mac_text, unwire, Connections};

/// Runs one command; Ok carries what to print on stdout (nothing for DEL, GC, STATUS
/// and a passing CHECK).
pub async fn run(env: &CniEnv, stdin: &[u8]) -> CniResult<Option<Value>> {
    if env.command == "VERSION" {
        let asked = serde_json::from_slice::<Value>(stdin).ok();
        let asked = asked
            .as_ref()
            .and_then(|v| v.get("cniVersion"))
            .and_then(Value::as_str);
        return Ok(Some(version_info(asked)));
    }
    let conf = NetConf::parse(stdin)?;
    let version = conf.version()?;
    version.require(&env.command)?;
    conf.validate()?;
    match env.command.as_str() {
        "ADD" => add(env, &conf, version).await.map(Some),
        "DEL" => del(env, &conf).await.map(|_| None),
        "CHECK" => check(env, &conf).await.map(|_| None),
        "GC" => gc(&conf).await.map(|_| None),
        "STATUS" => status(&conf).await.map(|_| None),
        other => Err(CniError::new(
            Code::InvalidEnvironment,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
        )),
    }
}

fn open_store(conf: &NetConf) -> CniResult<Box<dyn Store>> {
    conf.open_store()
}

/// The plugin's IPAM client: the plugin processes of this host take turns on the
/// store, and each remembers the node's blocks for the next.
fn host_ipam<'s>(store: &'s dyn Store, conf: &NetConf) -> Ipam<'s> {
    Ipam::new(store)
        .with_host_lock(conf.ipam_lock_path())
        .with_known_blocks_file(conf.known_blocks_path())
}

fn veth_name_for(env: &CniEnv, container_id: &str, ifname: &str) -> String {
    host_veth_name(env.pod_namespace(), env.pod_name(), container_id, ifname)
}

async fn add(env: &CniEnv, conf: &NetConf, version: CniVersion) -> CniResult<Value> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns = env.netns()?;
    let node = conf.resolve_node_name()?;
    let mtu = conf.resolve_mtu()?;
    let pools = conf.pools()?;
    let host_veth = veth_name_for(env, container_id, ifname);
    let started = std::time::Instant::now();
    let stage = |name: &str| {
        tracing::debug!(
            stage = name,
            elapsed_us = started.elapsed().as_micros() as u64
        )
    };

    // Everything that can fail without side effects comes first.
    let connections = Connections::open(netns)?;
    let id = handle_id(&conf.name, container_id, ifname);
    let _turn = exclusive_turn(&conf.attachment_lock_path(&id)).await?;
    let store = open_store(conf)?;
    let ipam = host_ipam(store.as_ref(), conf);
    connections.clear_leftovers(&host_veth, ifname).await?;
    stage("opened");

    ipam.ensure_pools(&pools).await?;
    let request = AllocationRequest {
        handle_id: id,
        network: conf.name.clone(),
        attrs: AllocationAttrs {
            pod: env.pod_name().map(str::to_string),
            namespace: env.pod_namespace().map(str::to_string),
            node,
            container_id: Some(container_id.to_string()),
            ifname: Some(ifname.to_string()),
            time: unix_now(),
        },
        host_interface: Some(host_veth.clone()),
        pool_filter: pools.iter().map(|p| p.cidr).collect(),
    };
    let (handle, created) = ipam.allocate(&request).await?;
    stage("allocated");
    let addresses: Vec<IpAddr> = handle.addresses.iter().map(|a| a.ip).collect();
    tracing::info!(handle = %handle.id, ?addresses, created, "allocated");

    // Only the families this attachment has addresses in: one route dump each.
    let mut takes_default = [false; 2];
    for (takes, v4) in takes_default.iter_mut().zip([true, false]) {
        if addresses.iter().any(|ip| ip.is_ipv4() == v4) {
            *takes = !connections.pod_has_default_route(v4).await?;
        }
    }
    let plan = PodNetwork {
        host_veth,
        ifname: ifname.to_string(),
        netns: netns.to_path_buf(),
        pod_mac: crate::pod_network::pod_mac(container_id, ifname),
        mtu,
        addresses: addresses.clone(),
        default_route_v4: takes_default[0],
        default_route_v6: takes_default[1],
        held: conf.policy_may_isolate(env.pod_namespace()),
    };
    let links = match connections.wire(&plan).await {
        Ok(links) => {
            stage("wired");
            links
        }
        Err(err) => {
            // Only release what this call allocated: a retried ADD's address may
            // still be the one the runtime recorded.
            if created {
                if let Err(e) = ipam.release(&handle.id).await {
                    tracing::error!(error = %e, handle = %handle.id, "undo: release allocation");
                }
            }
            return Err(err);
        }
    };

    let output = CniOutput {
        interfaces: vec![
            Interface {
                name: links.host.name.clone(),
                mac: mac_text(&links.host),
                sandbox: None,
            },
            Interface {
                name: links.pod.name.clone(),
                mac: mac_text(&links.pod),
                sandbox: Some(netns.display().to_string()),
            },
        ],
        ips: addresses
            .iter()
            .map(|ip| IpConfig {
                address: pod_address(*ip),
                gateway: Some(gateway_for(*ip)),
                interface: Some(1),
            })
            .collect(),
        routes: plan
            .routed_addresses()
            .map(|ip| Route {
                dst: default_destination(ip),
                gw: Some(gateway_for(ip)),
            })
            .collect(),
        dns: conf.dns.clone(),
    };
    Ok(output.to_json(version))
}

/// Tears one attachment down and releases its addresses; carries on past errors and
/// reports them all at the end. Works when the netns is gone or CNI_NETNS is empty.
async fn del(env: &CniEnv, conf: &NetConf) -> CniResult<()> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let store = open_store(conf)?;
    let ipam = host_ipam(store.as_ref(), conf);
    let id = handle_id(&conf.name, container_id, ifname);
    let lock_path = conf.attachment_lock_path(&id);
    let turn = exclusive_turn(&lock_path).await?;
    let netns = env
        .netns
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    tracing::info!(handle = %id, netns = %netns, "DEL");
    let handle = ipam.handle(&id).await?.map(|(h, _)| h);
    let host_veth = handle
        .as_ref()
        .and_then(|h| h.host_interface.clone())
        .unwrap_or_else(|| veth_name_for(env, container_id, ifname));
    let outcome = teardown(&ipam, &id, &host_veth, handle.as_ref()).await;
    if outcome.is_ok() {
        remove_lock_file(&lock_path, &turn);
    }
    outcome
}

async fn teardown(
    ipam: &Ipam<'_>,
    id: &str,
    host_veth: &str,
    handle: Option<&Handle>,
) -> CniResult<()> {
    let addresses: Vec<IpAddr> = handle
        .map(|h| h.addresses.iter().map(|a| a.ip).collect())
        .unwrap_or_default();
    let mut errors: Vec<CniError> = Vec::new();
    if let Err(e) = unwire(host_veth, &addresses).await {
        errors.push(e);
    }
    if handle.is_some() {
        if let Err(e) = ipam.release(id).await {
            errors.push(e.into());
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => {
            let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
            Err(errors.remove(0).with_details(all.join("; ")))
        }
    }
}

/// Compares the attachment with prevResult and the allocation; names what differs.
async fn check(env: &CniEnv, conf: &NetConf) -> CniResult<()> {
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns = env.netns()?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "CHECK needs prevResult in the network config",
        )
    })?;
    let prev = CniOutput::from_json(prev)?;
    let store = open_store(conf)?;
    let ipam = host_ipam(store.as_ref(), conf);
    let id = handle_id(&conf.name, container_id, ifname);
    let differs = |what: String| {
        Err(CniError::new(
            Code::CheckFailed,
            format!("CHECK {id}: {what}"),
        ))
    };

    let Some((handle, _)) = ipam.handle(&id).await? else {
        return differs("no allocation is recorded for this attachment".into());
    };
    if let Some(ip) = prev
        .ips
        .iter()
        .map(|ip| ip.address.ip())
        .find(|ip| !handle.addresses.iter().any(|a| a.ip == *ip))
    {
        return differs(format!("address {ip} is not allocated to this attachment"));
    }
    let host_veth = handle
        .host_interface
        .clone()
        .unwrap_or_else(|| veth_name_for(env, container_id, ifname));
    let plan = plan_from_prev_result(&prev, host_veth, ifname, netns, container_id)?;
    let connections = Connections::open(netns)?;
    let seen = connections.observe(&plan.host_veth, ifname).await?;
    match plan.differences(&seen) {
        Some(what) => differs(what),
        None => Ok(()),
    }
}

/// Releases every allocation of this network on this node whose attachment the
/// runtime no longer lists, and removes its host veth.
async fn gc(conf: &NetConf) -> CniResult<()> {
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let keep: BTreeSet<String> = valid
        .iter()
        .map(|a| handle_id(&conf.name, &a.container_id, &a.ifname))
        .collect();
    let node = conf.resolve_node_name()?;
    let store = open_store(conf)?;
    let ipam = host_ipam(store.as_ref(), conf);
    let mut first_error = None;
    for handle in ipam.stale_handles(&conf.name, &node, &keep).await? {
        let host_veth = handle.host_interface.clone().unwrap_or_default();
        tracing::info!(handle = %handle.id, "GC: releasing");
        let lock_path = conf.attachment_lock_path(&handle.id);
        let outcome = match exclusive_turn(&lock_path).await {
            Ok(turn) => {
                let outcome = teardown(&ipam, &handle.id, &host_veth, Some(&handle)).await;
                if outcome.is_ok() {
                    remove_lock_file(&lock_path, &turn);
                }
                outcome
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = outcome {
            tracing::error!(handle = %handle.id, error = %e, "GC: release failed");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Ready for ADD: the store can be written and there is a pool to allocate from.
async fn status(conf: &NetConf) -> CniResult<()> {
    let not_ready = |msg: String| CniError::new(Code::NotAvailable, msg);
    let store = open_store(conf).map_err(|e| not_ready(e.msg))?;
    store
        .check_writable()
        .await
        .map_err(|e| not_ready(format!("datastore cannot be written: {e}")))?;
    if conf.pools()?.is_empty() {
        let pools = Ipam::new(store.as_ref())
            .pools()
            .await
            .map_err(|e| not_ready(e.to_string()))?;
        if !pools.iter().any(|p| !p.disabled) {
            return Err(not_ready(
                "no enabled address pool in the config or the datastore".into(),
            ));
        }
    }
    Ok(())
}
