//! The voice pods' identity: a ServiceAccount of their own and nothing else. No Role,
//! no token: no code in the voice pod talks to Kubernetes (its config arrives as
//! mounts and env), so the pods run with `automountServiceAccountToken: false` and a
//! compromised pod holds no credential for the API. A dedicated account (rather than
//! the namespace's `default`) keeps whatever a cluster admin binds to `default` away
//! from the pods.

use k8s_openapi::api::core::v1::ServiceAccount;

use super::{BuildError, name_ns, owned_meta};
use callmeback_api::VoiceDeployment;

/// ServiceAccount name for deployment `vd`.
pub fn service_account_name(vd: &str) -> String {
    format!("{vd}-voice-pod")
}

/// The pods' ServiceAccount (its token is never mounted).
pub fn service_account(vd: &VoiceDeployment) -> Result<ServiceAccount, BuildError> {
    let (name, _) = name_ns(vd)?;
    Ok(ServiceAccount {
        metadata: owned_meta(vd, service_account_name(&name))?,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    })
}
