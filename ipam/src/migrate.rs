//! Copying a cluster's IPAM documents from one store to another (embedded store to
//! etcd when a cluster grows). Every document is created only where the target does
//! not have it; one the target holds with the same content counts as copied; one it
//! holds with other content is a conflict, reported and never overwritten. So a run
//! that was interrupted can simply be run again.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::{Expect, Store, Versioned, Write};
use crate::IpamError;

/// Every kind of document IPAM keeps.
pub const PREFIXES: [&str; 6] = [
    "config/",
    "pools/",
    "nodes/",
    "blocks/",
    "affinities/",
    "handles/",
];

/// etcd refuses transactions of more than 128 operations by default.
const WRITES_PER_COMMIT: usize = 100;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationReport {
    /// Documents written to the target by this run.
    pub copied: usize,
    /// Documents the target already held with the same content.
    pub already_present: usize,
    /// Keys the target holds with different content: left alone.
    pub conflicts: Vec<String>,
}

/// Pure: the creates that bring `target` up to `source`, and the report of the rest.
pub fn plan_migration(
    source: &[(String, Versioned)],
    target: &BTreeMap<String, Versioned>,
) -> (Vec<Write>, MigrationReport) {
    let mut report = MigrationReport::default();
    let mut writes = Vec::new();
    for (key, doc) in source {
        match target.get(key) {
            None => writes.push(Write::Put {
                key: key.clone(),
                value: doc.value.clone(),
                expect: Expect::Absent,
            }),
            Some(existing) if same_json(&existing.value, &doc.value) => report.already_present += 1,
            Some(_) => report.conflicts.push(key.clone()),
        }
    }
    (writes, report)
}

/// Equal as JSON values: formatting may differ between backends.
fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Copies every IPAM document from `source` to `target`. Stop the agents and plugins
/// writing to the source first: what they write afterwards is not copied.
pub async fn migrate(source: &dyn Store, target: &dyn Store) -> Result<MigrationReport, IpamError> {
    let mut from = Vec::new();
    let mut existing = BTreeMap::new();
    for prefix in PREFIXES {
        from.extend(source.list(prefix).await?);
        existing.extend(target.list(prefix).await?);
    }
    let (writes, mut report) = plan_migration(&from, &existing);
    let mut writes = writes.into_iter().peekable();
    while writes.peek().is_some() {
        let chunk: Vec<Write> = writes.by_ref().take(WRITES_PER_COMMIT).collect();
        let n = chunk.len();
        target.commit(chunk).await?;
        report.copied += n;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(value: &str) -> Versioned {
        Versioned {
            value: value.into(),
            revision: 1,
        }
    }

    #[test]
    fn copies_what_is_missing_skips_equal_and_reports_different() {
        let source = vec![
            ("pools/a".to_string(), doc(r#"{"x": 1}"#)),
            ("blocks/b".to_string(), doc(r#"{"y":2}"#)),
            ("handles/c".to_string(), doc(r#"{"z":3}"#)),
        ];
        let target = BTreeMap::from([
            ("pools/a".to_string(), doc(r#"{"x":1}"#)),
            ("blocks/b".to_string(), doc(r#"{"y":5}"#)),
        ]);
        let (writes, report) = plan_migration(&source, &target);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].key(), "handles/c");
        assert_eq!(report.already_present, 1);
        assert_eq!(report.conflicts, ["blocks/b"]);
    }
}
