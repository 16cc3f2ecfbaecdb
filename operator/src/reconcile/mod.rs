//! Reconcilers: one per custom resource, plus the helpers they share (server-side
//! apply under one field manager, condition bookkeeping that keeps
//! `lastTransitionTime` stable so unchanged status is never rewritten).

pub mod persona;
pub mod voice_deployment;

use std::fmt::Debug;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::Condition;
use crate::error::Result;
use crate::resources::FIELD_MANAGER;

/// Server-side apply `obj` (forcing ownership: the operator is the single writer of
/// what it manages). A no-op apply leaves the object and its resourceVersion alone.
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(obj)).await?)
}

/// Deletes `name` if it exists (objects the spec no longer asks for).
pub async fn delete_if_exists<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + DeserializeOwned + Clone + Debug,
{
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Server-side apply of a status: `{apiVersion, kind, status}` to `/status`.
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<()>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
    S: Serialize,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(&body))
        .await?;
    Ok(())
}

/// Now, RFC 3339, second precision (what `metav1.Time` keeps).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A condition that keeps the previous `lastTransitionTime` when its status did not
/// change, so recomputing an unchanged status yields an identical value.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now_rfc3339);
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}
