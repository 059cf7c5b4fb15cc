//! Kubernetes objects in files, as `kubectl get -o yaml` or `-o json` prints them:
//! several YAML documents and `kind: List` allowed. Shared by every controller that
//! reads `--services-dir` (the service proxy, `policy explain`).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One object of a file and where it sits (for log lines that name it).
pub struct Item {
    pub document: usize,
    /// Its index in a `kind: List`.
    pub in_list: Option<usize>,
    pub value: Value,
}

impl Item {
    /// "items[3]: " for an object of a List, "" otherwise.
    pub fn prefix(&self) -> String {
        self.in_list
            .map_or_else(String::new, |i| format!("items[{i}]: "))
    }
}

/// The objects of one file; Err when the file as a whole cannot be used.
pub fn read(path: &Path) -> Result<Vec<Item>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let documents: Vec<Value> = if is_json {
        vec![serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?]
    } else {
        serde_saphyr::from_multiple(&text).map_err(|e| format!("not YAML: {e}"))?
    };
    let mut items = Vec::new();
    for (document, doc) in documents.into_iter().enumerate() {
        if doc["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
            for (i, value) in doc["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                items.push(Item {
                    document,
                    in_list: Some(i),
                    value,
                });
            }
        } else {
            items.push(Item {
                document,
                in_list: None,
                value: doc,
            });
        }
    }
    Ok(items)
}

/// The object files of `dir` (`.yaml`, `.yml`, `.json`, not hidden), sorted.
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut present: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    present.sort();
    Ok(present)
}
