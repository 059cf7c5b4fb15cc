//! The datastore's schema version (`config/schema`), checked by every agent at start:
//! a store written by a newer Calyx is refused with a clear message (an old agent
//! would misread it, or write documents the new one cannot read); an older one is
//! migrated, one step at a time, each step recorded before the next.
//!
//! Version 1 is the layout of Calyx 0.1.0. Stores written before the version existed
//! are version 0: the same documents, so their migration only records the version.

use serde::{Deserialize, Serialize};

use crate::store::{Expect, Store, StoreError, Write};

pub const SCHEMA_KEY: &str = "config/schema";
/// The schema this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    pub version: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the datastore has schema version {found}, newer than this Calyx understands \
         (up to {supported}): it was written by a newer release; run that release (or \
         newer) here, never an older one against it"
    )]
    Newer { found: u32, supported: u32 },
    #[error("{key}: unreadable schema document ({reason}); not touching the datastore")]
    Unreadable { key: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a migration step does to go from version `from` to `from + 1` (documents to
/// write), given the store. Version 0 -> 1 changes no document.
async fn migrate_step(_store: &dyn Store, from: u32) -> Result<Vec<Write>, SchemaError> {
    match from {
        0 => Ok(Vec::new()),
        other => unreachable!("no migration from schema {other}"),
    }
}

/// Checks the store's schema and migrates an older one; returns the version found.
/// Safe against other agents doing the same at once: each step commits only if the
/// version is still the one it started from.
pub async fn ensure_current(store: &dyn Store) -> Result<u32, SchemaError> {
    loop {
        let current = store.get(SCHEMA_KEY).await?;
        let found = match &current {
            None => 0,
            Some(v) => {
                serde_json::from_str::<Schema>(&v.value)
                    .map_err(|e| SchemaError::Unreadable {
                        key: SCHEMA_KEY.into(),
                        reason: e.to_string(),
                    })?
                    .version
            }
        };
        if found > SCHEMA_VERSION {
            return Err(SchemaError::Newer {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found == SCHEMA_VERSION {
            return Ok(found);
        }
        let mut writes = migrate_step(store, found).await?;
        writes.push(Write::Put {
            key: SCHEMA_KEY.into(),
            value: serde_json::to_string(&Schema { version: found + 1 }).expect("serialises"),
            expect: Expect::from_current(current.as_ref()),
        });
        match store.commit(writes).await {
            Ok(_) => tracing::info!(from = found, to = found + 1, "datastore schema migrated"),
            // Another agent migrated meanwhile: read again.
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store;

    fn file_store(dir: &tempfile::TempDir) -> Box<dyn Store> {
        store::open(&format!("file://{}/store", dir.path().display())).unwrap()
    }

    async fn put(s: &dyn Store, key: &str, value: &str) {
        s.commit(vec![Write::Put {
            key: key.into(),
            value: value.into(),
            expect: Expect::Absent,
        }])
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_new_or_unversioned_store_is_brought_to_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = file_store(&dir);
        // Written before versions existed: documents, no schema key.
        put(
            s.as_ref(),
            "pools/10.244.0.0-16",
            r#"{"cidr":"10.244.0.0/16"}"#,
        )
        .await;
        assert_eq!(ensure_current(s.as_ref()).await.unwrap(), SCHEMA_VERSION);
        let schema = s.get(SCHEMA_KEY).await.unwrap().unwrap();
        assert_eq!(
            serde_json::from_str::<Schema>(&schema.value).unwrap(),
            Schema {
                version: SCHEMA_VERSION
            }
        );
        let pool = s.get("pools/10.244.0.0-16").await.unwrap().unwrap();
        assert_eq!(pool.value, r#"{"cidr":"10.244.0.0/16"}"#, "left as it was");
        // Again: nothing to do, nothing written.
        let revision = schema.revision;
        ensure_current(s.as_ref()).await.unwrap();
        assert_eq!(s.get(SCHEMA_KEY).await.unwrap().unwrap().revision, revision);
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = file_store(&dir);
        put(s.as_ref(), SCHEMA_KEY, r#"{"version":7}"#).await;
        let err = ensure_current(s.as_ref()).await.unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, SchemaError::Newer { found: 7, .. }),
            "{message}"
        );
        assert!(message.contains("schema version 7"), "{message}");
        assert!(message.contains("newer release"), "{message}");
        let kept = s.get(SCHEMA_KEY).await.unwrap().unwrap();
        assert_eq!(kept.value, r#"{"version":7}"#);

        let dir = tempfile::tempdir().unwrap();
        let s = file_store(&dir);
        put(s.as_ref(), SCHEMA_KEY, r#"{"version":"one"}"#).await;
        let err = ensure_current(s.as_ref()).await.unwrap_err();
        assert!(err.to_string().contains("config/schema"), "{err}");
    }
}
