//! The Kubernetes API client both controllers use (the proxy reads Services, the
//! overlay clears its Node's NetworkUnavailable condition).

use std::path::Path;

use kube::{Client, Config};

#[derive(Debug, thiserror::Error)]
pub enum KubeApiError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(transparent)]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes API client: {0}")]
    Client(#[from] kube::Error),
}

/// In-cluster config (or KUBECONFIG, ~/.kube/config), or the given kubeconfig file.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeApiError> {
    let config = match kubeconfig {
        Some(path) => {
            let named = |source| KubeApiError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(named)?;
            Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(named)?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}
