//! nftables mode: one `calyx-proxy` table per family, laid out by `table`, kept as
//! wanted across changes by a `TableAssembler` and written by the firewall layer's
//! `TableSync` (only what differs).

pub mod table;
#[cfg(test)]
mod trace;

use std::time::Instant;

use calyx_dataplane::firewall::nft::{self, TableSync, Touched};
use calyx_dataplane::firewall::{FirewallError, IpFamily};

use super::node::NodeSettings;
use super::proxier::{Changes, Prefetch, Proxier, Result, Scope};
use table::TableAssembler;
pub use table::TABLE;

pub struct NftablesProxier {
    backend: Box<dyn nft::Backend>,
    node: NodeSettings,
    tables: [TableSync; 2],
    /// The table as wanted, per family; None until a full sync builds it.
    assemblers: [Option<TableAssembler>; 2],
    /// This sync reads the kernel rather than trusting what was last written.
    reread: bool,
    /// Both tables as the kernel held them at start, read on another thread while the
    /// source lists (both take a while with many Services).
    prefetch: Option<Prefetch<Option<nft::Table>>>,
}

impl NftablesProxier {
    pub fn new(backend: Box<dyn nft::Backend>, node: NodeSettings) -> NftablesProxier {
        NftablesProxier {
            backend,
            node,
            tables: [TableSync::new(), TableSync::new()],
            assemblers: [None, None],
            reread: false,
            prefetch: None,
        }
    }

    /// Starts reading the kernel's tables for the first sync, with `read` (which owns
    /// its own backend: the thread outlives this call).
    pub fn prefetch(
        &mut self,
        read: impl FnOnce() -> [std::result::Result<Option<nft::Table>, FirewallError>; 2]
            + Send
            + 'static,
    ) {
        self.prefetch = Prefetch::start(read);
    }

    fn sync_family(&mut self, family: IpFamily, changes: &Changes) -> Result<usize> {
        let i = family as usize;
        let reread = self.reread;
        let started = Instant::now();
        let full = matches!(changes.scope, Scope::Full { .. });
        if full {
            self.assemblers[i] = None;
        }
        let node = &self.node;
        let assembler = self.assemblers[i].get_or_insert_with(|| TableAssembler::new(family, node));
        let mut touched = Touched::default();
        for (key, plans) in changes.services {
            let fragments = plans.iter().map(|p| table::fragment(p, family)).collect();
            assembler.replace(key, fragments, &mut touched);
        }
        let planned = started.elapsed();
        let tx = if full {
            self.tables[i].sync(self.backend.as_ref(), assembler.table(), reread)?
        } else {
            self.tables[i].sync_touched(self.backend.as_ref(), assembler.table(), &touched)?
        };
        tracing::debug!(%family, services = changes.services.len(), ?planned, written = ?started.elapsed(), ops = tx.ops.len(), "nftables sync");
        Ok(tx.ops.len())
    }
}

impl Proxier for NftablesProxier {
    fn begin(&mut self, scope: Scope) -> Result<()> {
        let syncs = &mut self.tables;
        self.reread = Prefetch::begin(&mut self.prefetch, scope, |i, read| {
            syncs[i].start_from(read)
        });
        Ok(())
    }

    fn sync(&mut self, family: IpFamily, changes: &Changes) -> Result<usize> {
        // After a failure what the kernel holds is unknown: rebuilt on the next sync.
        self.sync_family(family, changes)
            .inspect_err(|_| self.assemblers = [None, None])
    }

    fn drifted(&mut self) -> Option<String> {
        IpFamily::BOTH
            .into_iter()
            .zip(&self.tables)
            .find_map(
                |(family, table)| match table.drifted(self.backend.as_ref()) {
                    Ok(false) => None,
                    Ok(true) => Some(format!("{family}: the table lost rules or sets")),
                    Err(e) => Some(format!("{family}: could not look: {e}")),
                },
            )
    }
}

/// Removes the proxy's tables (another mode runs, or `--proxy-cleanup`).
pub fn remove_all(backend: &dyn nft::Backend) {
    for family in IpFamily::BOTH {
        let result = backend.dump(family.into(), TABLE).and_then(|current| {
            let tx = nft::plan_removal(current.as_ref(), family, TABLE);
            if !tx.is_empty() {
                backend.apply(&tx)?;
                tracing::info!(%family, "removed the nftables proxy table");
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(%family, error = %e, "could not remove the nftables proxy table");
        }
    }
}
