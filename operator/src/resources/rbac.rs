//! The voice pods' identity: a ServiceAccount and a Role that lets them get and
//! patch pods (each pod writes its own `controller.kubernetes.io/pod-deletion-cost`
//! so scale-down removes idle pods first). RBAC cannot name a pod that does not
//! exist yet, so the Role covers pods in the namespace; the pod only ever patches
//! `POD_NAME`. Nothing else: no Secrets, no ConfigMaps (those arrive as mounts/env).

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::{BuildError, name_ns, owned_meta};
use crate::crd::VoiceDeployment;

/// ServiceAccount, Role and RoleBinding name for deployment `vd`.
pub fn service_account_name(vd: &str) -> String {
    format!("{vd}-voice-pod")
}

/// The pods' ServiceAccount.
pub fn service_account(vd: &VoiceDeployment) -> Result<ServiceAccount, BuildError> {
    let (name, _) = name_ns(vd)?;
    Ok(ServiceAccount {
        metadata: owned_meta(vd, service_account_name(&name))?,
        ..ServiceAccount::default()
    })
}

/// The rules the pods get (the operator must hold them too: RBAC escalation check).
pub fn pod_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["pods".into()]),
        verbs: vec!["get".into(), "patch".into()],
        ..PolicyRule::default()
    }]
}

/// The pods' Role.
pub fn role(vd: &VoiceDeployment) -> Result<Role, BuildError> {
    let (name, _) = name_ns(vd)?;
    Ok(Role {
        metadata: owned_meta(vd, service_account_name(&name))?,
        rules: Some(pod_rules()),
    })
}

/// Binds the Role to the ServiceAccount.
pub fn role_binding(vd: &VoiceDeployment) -> Result<RoleBinding, BuildError> {
    let (name, ns) = name_ns(vd)?;
    let sa = service_account_name(&name);
    Ok(RoleBinding {
        metadata: owned_meta(vd, sa.clone())?,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: sa.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa,
            namespace: Some(ns),
            api_group: None,
        }]),
    })
}
