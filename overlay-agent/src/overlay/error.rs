//! Why the overlay controller could not start or reconcile.

use calyx_dataplane::firewall::FirewallError;
use calyx_dataplane::DataplaneError;
use calyx_ipam::store::StoreError;
use calyx_ipam::IpamError;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A setting that cannot work on this node, with the flag named.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A startup step that failed for good, named.
    #[error("{what}: {source}")]
    Step {
        what: String,
        #[source]
        source: IpamError,
    },
    #[error("{what}: {source}")]
    File {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel did not hold what it just acknowledged (a link gone right after its
    /// creation), or kernel events could not be followed.
    #[error("{0}")]
    Kernel(String),
}

pub type Result<T> = std::result::Result<T, OverlayError>;
