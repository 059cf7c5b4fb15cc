//! The kernel's nftables, through the `nft` tool (and, for element changes alone,
//! straight over netlink: `netlink`).

use std::collections::{BTreeMap, BTreeSet};

use super::{Backend, Chain, Family, Hook, Set, SetKind, Table, Transaction};
use crate::firewall::{run_tool, FirewallError};

/// The kernel, through the `nft` tool.
pub struct NftCommand;

impl Backend for NftCommand {
    fn dump(&self, family: Family, table: &str) -> Result<Option<Table>, FirewallError> {
        match list_json(&["list", "table", family.keyword(), table])? {
            Some(json) => parse_dump(family, table, &json).map(Some),
            None => Ok(None),
        }
    }

    fn apply(&self, tx: &Transaction) -> Result<(), FirewallError> {
        run_tool("nft", &["-f", "-"], Some(&tx.script())).map(|_| ())
    }

    /// Element changes alone go over netlink (see `netlink`); the rest to `nft -f`.
    fn apply_in(&self, tx: &Transaction, desired: &Table) -> Result<(), FirewallError> {
        match super::netlink::encode(tx, desired) {
            Some(batch) => super::netlink::send(
                &batch,
                &format!("table {} {}", tx.family.keyword(), tx.table),
            ),
            None => self.apply(tx),
        }
    }

    /// `nft -j list chains <family>`: chains without rules or set elements.
    fn chain_names(
        &self,
        family: Family,
        table: &str,
    ) -> Result<Option<BTreeSet<String>>, FirewallError> {
        let json = run_tool("nft", &["-j", "list", "chains", family.keyword()], None)?;
        let doc: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| FirewallError::Dump {
                what: format!("chains of {}", family.keyword()),
                why: e.to_string(),
            })?;
        let objects = doc["nftables"].as_array().into_iter().flatten();
        let mut table_seen = false;
        let mut names = BTreeSet::new();
        for chain in objects.filter_map(|o| o.get("chain")) {
            if chain["table"].as_str() == Some(table) {
                table_seen = true;
                names.extend(chain["name"].as_str().map(str::to_string));
            }
        }
        // A table without chains lists nothing here; ours always has its base chains.
        Ok(table_seen.then_some(names))
    }
}

/// `nft -j <args>`; None when the table named is not there.
fn list_json(args: &[&str]) -> Result<Option<String>, FirewallError> {
    let args: Vec<&str> = ["-j"].iter().chain(args).copied().collect();
    match run_tool("nft", &args, None) {
        Ok(json) => Ok(Some(json)),
        Err(FirewallError::Refused { stderr, .. }) if stderr.contains("No such file") => Ok(None),
        Err(e) => Err(e),
    }
}

/// A table's named counters: name -> (packets, bytes).
pub type Counters = BTreeMap<String, (u64, u64)>;

impl NftCommand {
    /// The named counters of a table. None when there is no such table.
    pub fn counters(family: Family, table: &str) -> Result<Option<Counters>, FirewallError> {
        let Some(json) = list_json(&["list", "counters", "table", family.keyword(), table])? else {
            return Ok(None);
        };
        let doc: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| FirewallError::Dump {
                what: format!("counters of {} {table}", family.keyword()),
                why: e.to_string(),
            })?;
        let counters = doc["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("counter"))
            .filter_map(|c| {
                Some((
                    c["name"].as_str()?.to_string(),
                    (c["packets"].as_u64()?, c["bytes"].as_u64()?),
                ))
            })
            .collect();
        Ok(Some(counters))
    }
}

/// Reads `nft -j list table` output back into a `Table` (rules as digests only).
pub fn parse_dump(
    family: impl Into<Family>,
    name: &str,
    json: &str,
) -> Result<Table, FirewallError> {
    let family = family.into();
    let bad = |why: String| FirewallError::Dump {
        what: format!("table {} {name}", family.keyword()),
        why,
    };
    let doc: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let objects = doc["nftables"]
        .as_array()
        .ok_or_else(|| bad("no \"nftables\" array".into()))?;
    let mut table = Table::new(family, name);
    let mut rules_seen: BTreeSet<String> = BTreeSet::new();
    for object in objects {
        if let Some(chain) = object.get("chain") {
            let name = chain["name"].as_str().unwrap_or_default().to_string();
            let hook = match (chain["type"].as_str(), chain["hook"].as_str()) {
                (Some(kind), Some(hook)) => Some(Hook {
                    kind: static_word(kind),
                    hook: static_word(hook),
                    priority: chain["prio"].as_i64().unwrap_or(0) as i32,
                }),
                _ => None,
            };
            table.chains.insert(
                name,
                Chain {
                    hook,
                    rules: Vec::new(),
                    kernel_digest: None,
                },
            );
        } else if let Some(rule) = object.get("rule") {
            // Rules come after their chain, in order: the first one carries the digest.
            let chain = rule["chain"].as_str().unwrap_or_default().to_string();
            if rules_seen.insert(chain.clone()) {
                let recorded = rule["comment"]
                    .as_str()
                    .unwrap_or("rules without a digest")
                    .to_string();
                if let Some(c) = table.chains.get_mut(&chain) {
                    c.kernel_digest = Some(recorded);
                }
            }
        } else if let Some(counter) = object.get("counter") {
            if let Some(name) = counter["name"].as_str() {
                table.counters.insert(name.to_string());
            }
        } else if let Some((kind, set)) = object
            .get("set")
            .map(|s| (SetKind::Set, s))
            .or_else(|| object.get("map").map(|m| (SetKind::Map, m)))
        {
            let name = set["name"].as_str().unwrap_or_default().to_string();
            let mut parsed = Set::new(kind, "");
            parsed.digest = set["comment"].as_str().unwrap_or_default().to_string();
            for element in set["elem"].as_array().into_iter().flatten() {
                match kind {
                    SetKind::Map => {
                        let pair = element
                            .as_array()
                            .filter(|p| p.len() == 2)
                            .ok_or_else(|| bad(format!("map {name}: element {element}")))?;
                        parsed.insert(element_text(&pair[0]), Some(element_text(&pair[1])));
                    }
                    SetKind::Set => parsed.insert(element_text(element), None),
                }
            }
            table.sets.insert(name, parsed);
        }
    }
    Ok(table)
}

/// Hook and chain-type words are a small fixed vocabulary.
fn static_word(word: &str) -> &'static str {
    const WORDS: [&str; 9] = [
        "nat",
        "filter",
        "route",
        "prerouting",
        "input",
        "forward",
        "output",
        "postrouting",
        "ingress",
    ];
    WORDS.into_iter().find(|w| *w == word).unwrap_or("unknown")
}

/// An element (key or value) of a JSON dump as nft's text syntax prints it.
fn element_text(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) => {
            if let Some(parts) = o.get("concat").and_then(Value::as_array) {
                parts
                    .iter()
                    .map(element_text)
                    .collect::<Vec<_>>()
                    .join(" . ")
            } else if let Some(p) = o.get("prefix") {
                format!("{}/{}", element_text(&p["addr"]), p["len"])
            } else if let Some(r) = o.get("range").and_then(Value::as_array) {
                format!(
                    "{}-{}",
                    element_text(&r[0]),
                    r.get(1).map(element_text).unwrap_or_default()
                )
            } else if let Some(e) = o.get("elem") {
                element_text(&e["val"])
            } else if let Some(t) = o.get("goto") {
                format!("goto {}", element_text(&t["target"]))
            } else if let Some(t) = o.get("jump") {
                format!("jump {}", element_text(&t["target"]))
            } else if let Some((verdict, _)) = o.iter().next() {
                // {"drop": null}, {"accept": null}
                verdict.clone()
            } else {
                String::new()
            }
        }
        other => other.to_string(),
    }
}
