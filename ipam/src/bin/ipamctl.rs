//! ipamctl: look at and repair Calyx IPAM state.
//!
//!   ipamctl [--datastore URL] [-o table|json] show [--blocks]
//!   ipamctl [--datastore URL] release --handle ID

use std::process::ExitCode;

use calyx_ipam::model::Block;
use calyx_ipam::store;
use calyx_ipam::Ipam;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "ipamctl",
    about = "Inspect and repair Calyx IP address management"
)]
struct Cli {
    /// The datastore: file:///path (embedded) or etcd://host:port.
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

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Per pool: addresses in all, in use and free; with --blocks, every block.
    Show {
        #[arg(long)]
        blocks: bool,
    },
    /// Frees every address a handle holds.
    Release {
        #[arg(long)]
        handle: String,
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipamctl: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let store = store::open(&cli.datastore)?;
    let ipam = Ipam::new(store.as_ref());
    match cli.command {
        Command::Show { blocks } => show(&ipam, blocks, cli.output).await,
        Command::Release { handle } => match ipam.release(&handle).await? {
            Some(released) => {
                let ips: Vec<String> = released
                    .addresses
                    .iter()
                    .map(|a| a.ip.to_string())
                    .collect();
                println!("released {handle}: {}", ips.join(", "));
                Ok(())
            }
            None => anyhow::bail!("--handle {handle}: no such handle"),
        },
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
        let total: u128 = 1u128
            << (if pool.is_ipv4() { 32 } else { 128 } - u32::from(pool.cidr.prefix())).min(127);
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
    match output {
        Output::Json => {
            let mut doc = json!({"pools": rows});
            if with_blocks {
                doc["blocks"] = block_rows.into();
            }
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Output::Table => {
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
        }
    }
    Ok(())
}
