//! ipamctl: look at and repair Calyx IPAM state.
//!
//!   ipamctl [--datastore URL] [-o table|json] show [--blocks | --ip IP | --node NODE]
//!   ipamctl check [--pods FILE] [--report FILE]
//!   ipamctl release (--ip IP | --handle ID | --from-report FILE)
//!   ipamctl node list | release NODE [--force]
//!   ipamctl pools list | add CIDR [--block-size N] [--no-nat] | disable NAME | delete NAME
//!   ipamctl config show | set [--strict-affinity BOOL] [--max-blocks-per-node N|unlimited]
//!                              [--ip-cooldown-seconds N] [--empty-block-grace-seconds N]
//!   ipamctl migrate --from URL --to URL

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use calyx_ipam::allocator::StoredBlock;
use calyx_ipam::check::{LivePods, Problem, ProblemKind};
use calyx_ipam::model::{affinity_key, pool_key, Block, Pool};
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
    /// Per pool: addresses in all, in use, free and blocks; with --blocks, every block.
    Show {
        #[arg(long)]
        blocks: bool,
        /// Everything about one address: its pool, block, allocation and handle.
        #[arg(long, conflicts_with_all = ["blocks", "node"])]
        ip: Option<IpAddr>,
        /// One node's blocks, and the addresses it borrowed or lent.
        #[arg(long, conflicts_with = "blocks")]
        node: Option<String>,
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
        /// The --pods file may list no pod at all and still mean it: every allocation
        /// is then reported as gone. Without it such a list is refused (an empty
        /// `kubectl` answer is more often the wrong cluster than an empty one).
        #[arg(long, requires = "pods")]
        allow_no_pods: bool,
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
        /// Release an address or handle even though a pod holds it. Without it, only
        /// what `check` found broken is released: a running pod's address freed here
        /// would be handed to the next pod while the first still uses it.
        #[arg(long, conflicts_with = "from_report")]
        force: bool,
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
    /// Cluster-wide IPAM settings.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Copies every IPAM document from one store to another (e.g. the embedded store
    /// to etcd). Never overwrites; safe to run again. Stop agents and plugins first.
    Migrate {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    List,
    /// Frees a departed node's blocks, tunnel addresses and record. Refuses while pod
    /// addresses remain on it unless --force (which releases them too).
    Release {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    Show,
    Set {
        /// Never borrow addresses from another node's block.
        #[arg(long)]
        strict_affinity: Option<bool>,
        /// Blocks one node may claim per IP family: a number or "unlimited".
        #[arg(long, value_parser = parse_limit)]
        max_blocks_per_node: Option<Limit>,
        /// How long a freed address rests before it is handed out again.
        #[arg(long)]
        ip_cooldown_seconds: Option<u64>,
        /// How long a block stays empty before it goes back to the pool.
        #[arg(long)]
        empty_block_grace_seconds: Option<u64>,
    },
}

#[derive(Clone, Copy)]
struct Limit(Option<u32>);

fn parse_limit(text: &str) -> Result<Limit, String> {
    match text {
        "unlimited" => Ok(Limit(None)),
        n => match n.parse::<u32>() {
            Ok(0) | Err(_) => Err(format!("{n:?} is not a positive number or \"unlimited\"")),
            Ok(n) => Ok(Limit(Some(n))),
        },
    }
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line naming the bad argument; `--help` has the rest.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("ipamctl: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
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
    if let Command::Migrate { from, to } = &cli.command {
        return migrate(from, to, cli.output).await;
    }
    let creates = matches!(
        cli.command,
        Command::Pools {
            command: PoolsCommand::Add { .. }
        } | Command::Config {
            command: ConfigCommand::Set { .. }
        }
    );
    if let Some(path) = store::missing_file_store(&cli.datastore).filter(|_| !creates) {
        bail!(
            "--datastore {}: no store at {path} (neither it nor {path}.journal exists)",
            cli.datastore
        );
    }
    let store = store::open(&cli.datastore)?;
    let ipam = Ipam::new(store.as_ref());
    match cli.command {
        Command::Show { ip: Some(ip), .. } => show_ip(&ipam, ip, cli.output).await?,
        Command::Show {
            node: Some(node), ..
        } => show_node(&ipam, &node, cli.output).await?,
        Command::Show { blocks, .. } => show(&ipam, blocks, cli.output).await?,
        Command::Check {
            pods,
            report,
            allow_no_pods,
        } => return check(&ipam, pods, report, allow_no_pods, cli.output).await,
        Command::Release {
            ip,
            handle,
            from_report,
            force,
        } => release(&ipam, ip, handle, from_report, force, cli.output).await?,
        Command::Node {
            command: NodeCommand::List,
        } => node_list(&ipam, cli.output).await?,
        Command::Node {
            command: NodeCommand::Release { name, force },
        } => {
            let known = ipam.nodes().await?.iter().any(|(n, _)| n.name == name)
                || ipam.blocks().await?.values().any(|b| {
                    b.block.affinity.as_deref() == Some(name.as_str())
                        || b.block.allocations.values().any(|a| a.attrs.node == name)
                });
            if !known {
                bail!(
                    "node release {name}: no such node (not registered, no blocks, no addresses)"
                );
            }
            let done = ipam.release_node(&name, force).await?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                println!(
                    "node {name}: released {} handle(s), {} block(s){}",
                    done.handles_released.len(),
                    done.blocks_released.len(),
                    if done.node_record_deleted {
                        ", deleted its node record"
                    } else {
                        ""
                    }
                );
            }
        }
        Command::Pools { command } => pools(&ipam, command, cli.output).await?,
        Command::Config { command } => config(&ipam, command, cli.output).await?,
        Command::Migrate { .. } => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn migrate(from: &str, to: &str, output: Output) -> anyhow::Result<ExitCode> {
    if from == to {
        bail!("--from and --to name the same store");
    }
    let source = store::open(from).context("--from")?;
    let target = store::open(to).context("--to")?;
    let report = calyx_ipam::migrate::migrate(source.as_ref(), target.as_ref()).await?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "copied {}, already present {}, conflicting {}",
            report.copied,
            report.already_present,
            report.conflicts.len()
        );
        for key in &report.conflicts {
            println!("  {key}: differs in {to}; left alone");
        }
    }
    Ok(if report.conflicts.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn config(ipam: &Ipam<'_>, command: ConfigCommand, output: Output) -> anyhow::Result<()> {
    let config = match command {
        ConfigCommand::Show => ipam.config().await?,
        ConfigCommand::Set {
            strict_affinity,
            max_blocks_per_node,
            ip_cooldown_seconds,
            empty_block_grace_seconds,
        } => {
            ipam.update_config(|c| {
                if let Some(v) = strict_affinity {
                    c.strict_affinity = v;
                }
                if let Some(Limit(v)) = max_blocks_per_node {
                    c.max_blocks_per_node = v;
                }
                if let Some(v) = ip_cooldown_seconds {
                    c.ip_cooldown_seconds = v;
                }
                if let Some(v) = empty_block_grace_seconds {
                    c.empty_block_grace_seconds = v;
                }
            })
            .await?
        }
    };
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&config)?);
    } else {
        let max = config
            .max_blocks_per_node
            .map_or("unlimited".to_string(), |n| n.to_string());
        println!("strictAffinity:          {}", config.strict_affinity);
        println!("maxBlocksPerNode:        {max}");
        println!("ipCooldownSeconds:       {}", config.ip_cooldown_seconds);
        println!(
            "emptyBlockGraceSeconds:  {}",
            config.empty_block_grace_seconds
        );
    }
    Ok(())
}

async fn show_ip(ipam: &Ipam<'_>, ip: IpAddr, output: Output) -> anyhow::Result<()> {
    let pools = ipam.pools().await?;
    let blocks = ipam.blocks().await?;
    let pool = pools.iter().find(|p| p.cidr.contains(ip));
    let block = blocks
        .values()
        .map(|b| &b.block)
        .find(|b| b.cidr.contains(ip));
    let allocation = block.and_then(|b| b.allocations.get(&b.ordinal_of(ip)?));
    let handle = match allocation {
        Some(a) => ipam.handle(&a.handle).await?.map(|(h, _)| h),
        None => None,
    };
    let state = match (pool, block, allocation) {
        (None, None, _) => "outside every pool",
        (_, None, _) => "free (its block is not claimed)",
        (_, Some(_), None) => "free",
        (_, Some(_), Some(_)) => "allocated",
    };
    let doc = json!({
        "ip": ip, "state": state,
        "pool": pool.map(|p| &p.name),
        "block": block.map(|b| b.cidr.to_string()),
        "blockNode": block.and_then(|b| b.affinity.clone()),
        "allocation": allocation,
        "borrowed": allocation.is_some_and(|a| block.and_then(|b| b.affinity.as_deref()) != Some(a.attrs.node.as_str())),
        "hostInterface": handle.as_ref().and_then(|h| h.host_interface.clone()),
        "handleExists": handle.is_some(),
    });
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("{ip}: {state}");
    for (label, value) in [
        ("pool", &doc["pool"]),
        ("block", &doc["block"]),
        ("block node", &doc["blockNode"]),
    ] {
        println!("  {label:<14} {}", cell(value));
    }
    if let Some(a) = allocation {
        println!("  {:<14} {}", "handle", a.handle);
        println!("  {:<14} {}", "seq", a.seq);
        println!("  {:<14} {}", "node", a.attrs.node);
        if doc["borrowed"] == true {
            println!(
                "  {:<14} yes (the block belongs to another node)",
                "borrowed"
            );
        }
        let pod = match (&a.attrs.namespace, &a.attrs.pod) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            _ => "-".into(),
        };
        println!("  {:<14} {pod}", "pod");
        println!("  {:<14} {}", "allocated at", a.attrs.time);
        println!("  {:<14} {}", "host interface", cell(&doc["hostInterface"]));
        if handle.is_none() {
            println!("  warning: its handle does not exist (see `ipamctl check`)");
        }
    }
    Ok(())
}

async fn show_node(ipam: &Ipam<'_>, node: &str, output: Output) -> anyhow::Result<()> {
    let blocks: Vec<Block> = ipam
        .blocks()
        .await?
        .into_values()
        .map(|b| b.block)
        .collect();
    let registered = ipam.nodes().await?.iter().any(|(n, _)| n.name == node);
    let owned: Vec<&Block> = blocks
        .iter()
        .filter(|b| b.affinity.as_deref() == Some(node))
        .collect();
    let mut borrowed = Vec::new();
    let mut lent = Vec::new();
    for b in &blocks {
        for &ordinal in b.allocations.keys() {
            let Some(borrower) = b.borrower_of(ordinal) else {
                continue;
            };
            let row = json!({"ip": b.ip_at(ordinal), "block": b.cidr.to_string(),
                             "blockNode": b.affinity, "borrower": borrower});
            if borrower == node {
                borrowed.push(row);
            } else if b.affinity.as_deref() == Some(node) {
                lent.push(row);
            }
        }
    }
    if owned.is_empty() && borrowed.is_empty() && !registered {
        bail!("--node {node}: no such node (not registered, no blocks, no addresses)");
    }
    let block_rows: Vec<_> = owned
        .iter()
        .map(|b| {
            json!({"block": b.cidr.to_string(), "pool": b.pool,
                        "inUse": b.allocations.len(), "free": b.free_count(),
                        "emptySince": b.empty_since})
        })
        .collect();
    if output == Output::Json {
        let doc = json!({"node": node, "registered": registered, "blocks": block_rows,
                         "borrowed": borrowed, "lent": lent});
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "node {node}{}",
        if registered { "" } else { " (not registered)" }
    );
    println!(
        "{:<26} {:<32} {:>7} {:>6}",
        "BLOCK", "POOL", "IN USE", "FREE"
    );
    for r in &block_rows {
        println!(
            "{:<26} {:<32} {:>7} {:>6}",
            r["block"].as_str().unwrap_or_default(),
            r["pool"].as_str().unwrap_or_default(),
            cell(&r["inUse"]),
            cell(&r["free"])
        );
    }
    for (title, rows) in [("borrowed from", &borrowed), ("lent to", &lent)] {
        for r in rows {
            let other = if title == "lent to" {
                &r["borrower"]
            } else {
                &r["blockNode"]
            };
            println!(
                "{} {title} {} (block {})",
                r["ip"].as_str().unwrap_or_default(),
                other.as_str().unwrap_or("-"),
                r["block"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

async fn check(
    ipam: &Ipam<'_>,
    pods: Option<PathBuf>,
    report: Option<PathBuf>,
    allow_no_pods: bool,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let live = match &pods {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--pods {}", path.display()))?;
            let live = LivePods::from_json(&text)
                .map_err(|e| anyhow::anyhow!("--pods {}: {e}", path.display()))?;
            if live.pods.is_empty() && live.attachments.is_empty() && !allow_no_pods {
                bail!(
                    "--pods {}: lists no pod, which would report every allocation as gone \
                     (is kubectl pointed at the right cluster?); pass --allow-no-pods if \
                     none runs",
                    path.display()
                );
            }
            Some(live)
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
    force: bool,
    output: Output,
) -> anyhow::Result<()> {
    let in_use = |what: String, handle: &str| {
        anyhow::anyhow!(
            "{what} is held by handle {handle}, as a running pod's address is; releasing it \
             would hand the address to the next pod while this one still uses it. If the pod \
             is gone: `ipamctl check --pods PODS --report R` then `ipamctl release \
             --from-report R`; or pass --force"
        )
    };
    let mut released = Vec::new();
    let mut skipped = Vec::new();
    if let Some(ip) = ip {
        match ipam.release_ip(ip, None, force).await? {
            ReleaseOutcome::Released(h) => released.push(h),
            ReleaseOutcome::InUse(h) => return Err(in_use(format!("--ip {ip}"), &h)),
            _ => bail!("--ip {ip}: the address is not allocated"),
        }
    } else if let Some(handle) = handle {
        match ipam.release_handle(&handle, force).await? {
            ReleaseOutcome::Released(h) => released.push(h),
            ReleaseOutcome::InUse(h) => return Err(in_use(format!("--handle {h}"), &h)),
            _ => bail!("--handle {handle}: no such handle"),
        }
    } else if let Some(path) = from_report {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--from-report {}", path.display()))?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--from-report {}: not JSON", path.display()))?;
        let problems: Vec<Problem> = serde_json::from_value(doc["problems"].clone())
            .with_context(|| format!("--from-report {}: no problems list", path.display()))?;
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
                    ipam.release_ip(ip, Some(seq), false).await?
                }
                _ => {
                    skipped.push(format!("not repaired automatically: {}", p.detail));
                    continue;
                }
            };
            match outcome {
                ReleaseOutcome::Released(h) => released.push(h),
                ReleaseOutcome::Changed | ReleaseOutcome::InUse(_) => {
                    skipped.push(format!("changed since the report: {}", p.detail))
                }
                ReleaseOutcome::NotAllocated => {}
            }
        }
    } else {
        bail!("release needs --ip, --handle or --from-report");
    }
    if output == Output::Json {
        println!(
            "{}",
            serde_json::json!({"released": released, "skipped": skipped})
        );
    } else {
        for h in &released {
            println!("released {h}");
        }
        for why in &skipped {
            println!("skipped ({why})");
        }
        println!("{} released, {} skipped", released.len(), skipped.len());
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
            ipam.add_pool(&pool)
                .await
                .with_context(|| format!("CIDR {cidr}: add pool {}", pool.name))?;
            if output == Output::Json {
                println!("{}", json!({"added": pool.name, "cidr": pool.cidr}));
            } else {
                println!("added pool {} ({})", pool.name, pool.cidr);
            }
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
            if output == Output::Json {
                println!("{}", json!({"disabled": name}));
            } else {
                println!("disabled pool {name}");
            }
        }
        PoolsCommand::Delete { name } => {
            let current = store
                .get(&pool_key(&name))
                .await?
                .with_context(|| format!("NAME {name}: no such pool"))?;
            let blocks: Vec<(String, StoredBlock)> = ipam
                .blocks()
                .await?
                .into_iter()
                .filter(|(_, b)| b.block.pool == name)
                .collect();
            let in_use: usize = blocks.iter().map(|(_, b)| b.block.allocations.len()).sum();
            if in_use > 0 {
                bail!("NAME {name}: the pool still holds {in_use} allocation(s); disable it and release them first");
            }
            // Disabled first, so nothing claims a block while its empty blocks and
            // their index entries go; the pool document last, so a run that stops
            // half-way can be repeated.
            let mut pool: Pool = serde_json::from_str(&current.value)?;
            let mut revision = current.revision;
            if !pool.disabled {
                pool.disabled = true;
                revision = store
                    .commit(vec![Write::Put {
                        key: pool_key(&name),
                        value: serde_json::to_string(&pool)?,
                        expect: Expect::Revision(revision),
                    }])
                    .await?;
            }
            let index: BTreeMap<String, u64> = store
                .list("affinities/")
                .await?
                .into_iter()
                .map(|(key, v)| (key, v.revision))
                .collect();
            let mut writes = Vec::new();
            for (key, stored) in &blocks {
                writes.push(Write::Delete {
                    key: key.clone(),
                    expect: Expect::Revision(stored.revision),
                });
                let entry = stored
                    .block
                    .affinity
                    .as_deref()
                    .map(|node| affinity_key(node, &stored.block.cidr));
                if let Some((entry, revision)) = entry.and_then(|e| index.get_key_value(&e)) {
                    writes.push(Write::Delete {
                        key: entry.clone(),
                        expect: Expect::Revision(*revision),
                    });
                }
            }
            for chunk in writes.chunks(100) {
                store.commit(chunk.to_vec()).await?;
            }
            store
                .commit(vec![Write::Delete {
                    key: pool_key(&name),
                    expect: Expect::Revision(revision),
                }])
                .await?;
            if output == Output::Json {
                println!("{}", json!({"deleted": name}));
            } else {
                println!("deleted pool {name}");
            }
        }
    }
    Ok(())
}

/// A JSON value as a table cell: strings without quotes, null as "-". (Value's
/// Display ignores width, so cells are Strings.)
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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
        let free = total - in_use as u128;
        rows.push(json!({
            "pool": pool.name, "cidr": pool.cidr.to_string(), "disabled": pool.disabled,
            "total": total.to_string(), "inUse": in_use, "free": free.to_string(),
            "blocks": of_pool.len(),
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
        "{:<32} {:<20} {:>12} {:>8} {:>12} {:>7}",
        "POOL", "CIDR", "TOTAL", "IN USE", "FREE", "BLOCKS"
    );
    for r in &rows {
        println!(
            "{:<32} {:<20} {:>12} {:>8} {:>12} {:>7}",
            r["pool"].as_str().unwrap_or_default(),
            r["cidr"].as_str().unwrap_or_default(),
            r["total"].as_str().unwrap_or_default(),
            cell(&r["inUse"]),
            r["free"].as_str().unwrap_or_default(),
            cell(&r["blocks"])
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
                cell(&r["inUse"]),
                cell(&r["free"])
            );
        }
    }
    Ok(())
}
