//! CNI errors: a spec error code, a message that names what failed, and details.

use std::fmt;

use calyx_dataplane::DataplaneError;
use calyx_ipam::store::StoreError;
use calyx_ipam::IpamError;

/// Error codes from the CNI specification, plus Calyx's own (100 and up, as the spec
/// reserves them for plugins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    /// Calyx: no free address in the pools this node may use.
    PoolExhausted = 100,
    /// Calyx: CHECK found the attachment differs from its prevResult.
    CheckFailed = 101,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The spec's error object (the same shape in every version Calyx speaks).
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut obj = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            obj["details"] = self.details.clone().into();
        }
        obj
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[code {}] {}", self.code as u32, self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

impl From<StoreError> for CniError {
    fn from(err: StoreError) -> CniError {
        let code = match &err {
            StoreError::Unavailable { .. } | StoreError::Conflict { .. } => Code::TryAgainLater,
            StoreError::BadUrl { .. } => Code::InvalidConfig,
            StoreError::Io { .. } | StoreError::Corrupt { .. } | StoreError::Damaged { .. } => {
                Code::Io
            }
        };
        CniError::new(code, err.to_string())
    }
}

impl From<IpamError> for CniError {
    fn from(err: IpamError) -> CniError {
        match err {
            IpamError::Store(e) => e.into(),
            IpamError::PoolExhausted(_) => CniError::new(Code::PoolExhausted, err.to_string()),
            IpamError::NoPools => CniError::new(
                Code::InvalidConfig,
                "no enabled address pool to allocate from: the pools network config field \
                 ipam.pools names are disabled in the datastore, or it names none and the \
                 datastore has none enabled (add one with `ipamctl pools add`)",
            ),
            IpamError::PoolOverlap { .. } => CniError::new(
                Code::InvalidConfig,
                format!("network config field ipam.pools: {err}"),
            ),
            IpamError::TooManyConflicts { .. } | IpamError::HostLock { .. } => {
                CniError::new(Code::TryAgainLater, err.to_string())
            }
            // Only `ipamctl node release` raises it; never a plugin call.
            IpamError::NodeNotEmpty { .. } => CniError::new(Code::Io, err.to_string()),
            // The agent checks the schema; the plugin never does.
            IpamError::Schema(_) => CniError::new(Code::Io, err.to_string()),
        }
    }
}

impl From<DataplaneError> for CniError {
    fn from(err: DataplaneError) -> CniError {
        let code = match &err {
            DataplaneError::Netns {
                not_found: true, ..
            } => Code::UnknownContainer,
            _ => Code::Io,
        };
        CniError::new(code, err.to_string())
    }
}

pub type CniResult<T> = Result<T, CniError>;
