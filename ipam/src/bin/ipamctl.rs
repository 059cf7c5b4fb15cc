//! ipamctl: look at and repair Calyx IPAM state.
//!
//!   ipamctl [--datastore URL] [-o table|json] show [--blocks]
//!   ipamctl check [--pods FILE] [--report FILE]
//!   ipamctl release (--ip IP | --handle ID | --from-report FILE)
//!   ipamctl node list
//!   ipamctl pools list | add CIDR [--block-size N] [--no-nat] | disable NAME | delete NAME

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use calyx_ipam::check::{LivePods, Problem, ProblemKind};
use calyx_ipam::model::{pool_key, Block, Pool};
use calyx_ipam::store::{self, Expect, Write};
use calyx_ipam::{Ipam, ReleaseOutcome};
use clap::{Parser, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "ipamctl",
    about = "Inspect and repair Calyx IP address management"
)]
struct Cli {
    /// The datastore: file:///path (embedded) or etcd://host:port[,host:port].
    #[arg(
        long,
        env = "CALYX_DATASTORE",
        default_value = "file:///var/lib/calyx/store",
        global = true
    )]
    datastore: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Per pool: addresses in all, in use and blocks; with --blocks, every block.
    Show {
        #[arg(long)]
        blocks: bool,
    },
    /// Lists every inconsistency; exits 1 when there is any.
    Check {
        /// Live pods: `kubectl get pods -A -o json` output, or a JSON list of
        /// {"containerID", "ifname"} attachments. Allocations of other pods are reported.
        #[arg(long)]
        pods: Option<PathBuf>,
        /// Also write the problems as JSON, for `release --from-report`.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Frees addresses.
    Release {
        #[arg(long, conflicts_with_all = ["handle", "from_report"])]
        ip: Option<IpAddr>,
        #[arg(long, conflicts_with = "from_report")]
        handle: Option<String>,
        /// Repairs what a `check --report` found, refusing anything changed since.
        #[arg(long)]
        from_report: Option<PathBuf>,
    },
    /// Nodes registered by their agents.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Address pools.
    Pools {
        #[command(subcommand)]
        command: PoolsCommand,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    List,
}

#[derive(Subcommand)]
enum PoolsCommand {
    List,
    Add {
        cidr: IpNetwork,
        #[arg(long)]
        block_size: Option<u8>,
        /// Do not masquerade traffic from this pool leaving the pools.
        #[arg(long)]
        no_nat: bool,
        #[arg(long)]
        name: Option<String>,
    },
    /// Stops allocating from a pool (existing addresses stay).
    Disable {
        name: String,
    },
    /// Deletes a pool that holds no allocation.
    Delete {
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ipamctl: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ipamctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let store = store::open(&cli.datastore)?;
    let ipam = Ipam::new(store.as_ref());
    match cli.command {
        Command::Show { blocks } => show(&ipam, blocks, cli.output).await?,
        Command::Check { pods, report } => return check(&ipam, pods, report, cli.output).await,
        Command::Release {
            ip,
            handle,
            from_report,
        } => release(&ipam, ip, handle, from_report).await?,
        Command::Node {
            command: NodeCommand::List,
        } => node_list(&ipam, cli.output).await?,
        Command::Pools { command } => pools(&ipam, command, cli.output).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn check(
    ipam: &Ipam<'_>,
    pods: Option<PathBuf>,
    report: Option<PathBuf>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let live = match &pods {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--pods {}", path.display()))?;
            Some(
                LivePods::from_json(&text)
                    .map_err(|e| anyhow::anyhow!("--pods {}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    let problems = ipam.check(live.as_ref()).await?;
    if let Some(path) = &report {
        let doc = json!({"datastore": ipam.store().location(), "problems": problems});
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("--report {}", path.display()))?;
    }
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({"problems": problems}))?
        ),
        Output::Table if problems.is_empty() => println!("no problems found"),
        Output::Table => {
            println!(
                "{:<26} {:<40} {:<20} DETAIL",
                "PROBLEM", "HANDLE", "ADDRESS"
            );
            for p in &problems {
                println!(
                    "{:<26} {:<40} {:<20} {}",
                    format!("{:?}", p.kind),
                    p.handle.as_deref().unwrap_or("-"),
                    p.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into()),
                    p.detail
                );
            }
            println!("{} problem(s)", problems.len());
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn release(
    ipam: &Ipam<'_>,
    ip: Option<IpAddr>,
    handle: Option<String>,
    from_report: Option<PathBuf>,
) -> anyhow::Result<()> {
    if let Some(ip) = ip {
        match ipam.release_ip(ip, None).await? {
            ReleaseOutcome::Released(h) => println!("released {ip} (handle {h})"),
            _ => bail!("--ip {ip}: the address is not allocated"),
        }
    } else if let Some(handle) = handle {
        match ipam.release(&handle).await? {
            Some(released) => {
                let ips: Vec<String> = released
                    .addresses
                    .iter()
                    .map(|a| a.ip.to_string())
                    .collect();
                println!("released {handle}: {}", ips.join(", "));
            }
            None => bail!("--handle {handle}: no such handle"),
        }
    } else if let Some(path) = from_report {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--from-report {}", path.display()))?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--from-report {}: not JSON", path.display()))?;
        let problems: Vec<Problem> = serde_json::from_value(doc["problems"].clone())
            .with_context(|| format!("--from-report {}: no problems list", path.display()))?;
        let (mut released, mut skipped) = (0, 0);
        for p in &problems {
            let outcome = match (p.kind, &p.handle, p.handle_revision, p.ip, p.seq) {
                (
                    ProblemKind::PodGone | ProblemKind::HandleWithoutAllocation,
                    Some(h),
                    Some(rev),
                    _,
                    _,
                ) => ipam.release_handle_at(h, rev).await?,
                (ProblemKind::AllocationWithoutHandle, _, _, Some(ip), Some(seq)) => {
                    ipam.release_ip(ip, Some(seq)).await?
                }
                _ => {
                    println!("not repaired automatically: {}", p.detail);
                    continue;
                }
            };
            match outcome {
                ReleaseOutcome::Released(h) => {
                    released += 1;
                    println!("released {h}");
                }
                ReleaseOutcome::Changed => {
                    skipped += 1;
                    println!("skipped (changed since the report): {}", p.detail);
                }
                ReleaseOutcome::NotAllocated => {}
            }
        }
        println!("{released} released, {skipped} skipped");
    } else {
        bail!("release needs --ip, --handle or --from-report");
    }
    Ok(())
}

async fn node_list(ipam: &Ipam<'_>, output: Output) -> anyhow::Result<()> {
    let nodes = ipam.nodes().await?;
    let blocks: Vec<Block> = ipam
        .blocks()
        .await?
        .into_values()
        .map(|b| b.block)
        .collect();
    let rows: Vec<_> = nodes
        .iter()
        .map(|(n, _)| {
            let owned: Vec<String> = blocks
                .iter()
                .filter(|b| b.affinity.as_deref() == Some(n.name.as_str()))
                .map(|b| b.cidr.to_string())
                .collect();
            json!({"name": n.name, "underlayIp": n.underlay_ip, "vtepIpv4": n.vtep_ipv4,
                   "vtepIpv6": n.vtep_ipv6, "vtepMac": n.vtep_mac, "heartbeat": n.heartbeat, "blocks": owned})
        })
        .collect();
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<16} {:<16} {:<18} BLOCKS",
        "NODE", "UNDERLAY", "VTEP", "VTEP MAC"
    );
    for r in &rows {
        let blocks: Vec<&str> = r["blocks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str())
            .collect();
        println!(
            "{:<16} {:<16} {:<16} {:<18} {}",
            r["name"].as_str().unwrap_or_default(),
            r["underlayIp"].as_str().unwrap_or_default(),
            r["vtepIpv4"].as_str().unwrap_or("-"),
            r["vtepMac"].as_str().unwrap_or_default(),
            blocks.join(",")
        );
    }
    Ok(())
}

async fn pools(ipam: &Ipam<'_>, command: PoolsCommand, output: Output) -> anyhow::Result<()> {
    let store = ipam.store();
    match command {
        PoolsCommand::List => {
            let pools = ipam.pools().await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&pools)?);
                return Ok(());
            }
            println!(
                "{:<32} {:<22} {:>6} {:>6} {:>9}",
                "NAME", "CIDR", "BLOCK", "NAT", "DISABLED"
            );
            for p in pools {
                println!(
                    "{:<32} {:<22} {:>6} {:>6} {:>9}",
                    p.name,
                    p.cidr.to_string(),
                    p.block_size,
                    p.nat_outgoing,
                    p.disabled
                );
            }
        }
        PoolsCommand::Add {
            cidr,
            block_size,
            no_nat,
            name,
        } => {
            let mut pool = Pool::with_defaults(cidr, block_size)
                .map_err(|e| anyhow::anyhow!("--block-size: {e}"))?;
            pool.nat_outgoing = !no_nat;
            if let Some(name) = name {
                pool.name = name;
            }
            if let Some(other) = ipam
                .pools()
                .await?
                .iter()
                .find(|p| overlaps(&p.cidr, &pool.cidr))
            {
                bail!("CIDR {cidr} overlaps pool {} ({})", other.name, other.cidr);
            }
            store
                .commit(vec![Write::Put {
                    key: pool_key(&pool.name),
                    value: serde_json::to_string(&pool)?,
                    expect: Expect::Absent,
                }])
                .await
                .with_context(|| format!("add pool {}", pool.name))?;
            println!("added pool {} ({})", pool.name, pool.cidr);
        }
        PoolsCommand::Disable { name } => {
            let current = store
                .get(&pool_key(&name))
                .await?
                .with_context(|| format!("NAME {name}: no such pool"))?;
            let mut pool: Pool = serde_json::from_str(&current.value)?;
            pool.disabled = true;
            store
                .commit(vec![Write::Put {
                    key: pool_key(&name),
                    value: serde_json::to_string(&pool)?,
                    expect: Expect::Revision(current.revision),
                }])
                .await?;
            println!("disabled pool {name}");
        }
        PoolsCommand::Delete { name } => {
            let current = store
                .get(&pool_key(&name))
                .await?
                .with_context(|| format!("NAME {name}: no such pool"))?;
            let in_use: usize = ipam
                .blocks()
                .await?
                .values()
                .filter(|b| b.block.pool == name)
                .map(|b| b.block.allocations.len())
                .sum();
            if in_use > 0 {
                bail!("NAME {name}: the pool still holds {in_use} allocation(s); disable it and release them first");
            }
            store
                .commit(vec![Write::Delete {
                    key: pool_key(&name),
                    expect: Expect::Revision(current.revision),
                }])
                .await?;
            println!("deleted pool {name}");
        }
    }
    Ok(())
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

async fn show(ipam: &Ipam<'_>, with_blocks: bool, output: Output) -> anyhow::Result<()> {
    let pools = ipam.pools().await?;
    let blocks: Vec<Block> = ipam
        .blocks()
        .await?
        .into_values()
        .map(|b| b.block)
        .collect();
    let mut rows = Vec::new();
    for pool in &pools {
        let bits = if pool.is_ipv4() { 32 } else { 128 } - u32::from(pool.cidr.prefix());
        let total: u128 = 1u128 << bits.min(127);
        let of_pool: Vec<&Block> = blocks.iter().filter(|b| b.pool == pool.name).collect();
        let in_use: usize = of_pool.iter().map(|b| b.allocations.len()).sum();
        rows.push(json!({
            "pool": pool.name, "cidr": pool.cidr.to_string(), "disabled": pool.disabled,
            "total": total.to_string(), "inUse": in_use, "blocks": of_pool.len(),
        }));
    }
    let block_rows: Vec<_> = blocks
        .iter()
        .map(|b| {
            json!({"block": b.cidr.to_string(), "pool": b.pool, "node": b.affinity,
                   "inUse": b.allocations.len(), "free": b.free_count()})
        })
        .collect();
    if output == Output::Json {
        let mut doc = json!({"pools": rows});
        if with_blocks {
            doc["blocks"] = block_rows.into();
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<20} {:>12} {:>8} {:>7}",
        "POOL", "CIDR", "TOTAL", "IN USE", "BLOCKS"
    );
    for r in &rows {
        println!(
            "{:<32} {:<20} {:>12} {:>8} {:>7}",
            r["pool"].as_str().unwrap_or_default(),
            r["cidr"].as_str().unwrap_or_default(),
            r["total"].as_str().unwrap_or_default(),
            r["inUse"],
            r["blocks"]
        );
    }
    if with_blocks {
        println!();
        println!(
            "{:<26} {:<12} {:>7} {:>6}",
            "BLOCK", "NODE", "IN USE", "FREE"
        );
        for r in &block_rows {
            println!(
                "{:<26} {:<12} {:>7} {:>6}",
                r["block"].as_str().unwrap_or_default(),
                r["node"].as_str().unwrap_or("-"),
                r["inUse"],
                r["free"]
            );
        }
    }
    Ok(())
}
