//! The Kubernetes API client both controllers use (the proxy reads Services, the
//! overlay clears its Node's NetworkUnavailable condition).

use std::path::Path;

use kube::{Client, Config};

/// In-cluster config (or KUBECONFIG, ~/.kube/config), or the given kubeconfig file.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)?;
            Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}
