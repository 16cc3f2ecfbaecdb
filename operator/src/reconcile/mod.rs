//! Reconcilers: one per custom resource, plus the helpers they share (server-side
//! apply under one field manager, the ownership check that comes before it,
//! condition bookkeeping that keeps `lastTransitionTime` stable so unchanged status
//! is never rewritten).
//!
//! Ownership: a forced server-side apply takes over any same-named object, and the
//! owner reference it adds makes the garbage collector delete that object with its
//! new owner. So before writing, [`foreign`] reads the existing object, and the
//! reconcilers refuse (a condition and an Event) to touch one they do not own.

pub mod persona;
pub mod voice_deployment;

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::observed::{ObjKey, Observed, digest};
use crate::resources::{FIELD_MANAGER, MANAGED_BY, PERSONA_LABEL, VOICE_DEPLOYMENT_LABEL};
use callmeback_api::Condition;

/// How soon a reconcile blocked by someone else's object looks again (that object's
/// removal triggers no watch: it lacks the operator's labels).
pub const NOT_OWNED_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether the operator may write `existing` as `desired` (same name): it carries
/// the owner reference `desired` carries, or it is an orphan of ours (no controller,
/// our `managed-by` label and the same owner-name label, as an object left by
/// `kubectl delete --cascade=orphan` is). Anything else belongs to someone else.
pub fn may_write(existing: &ObjectMeta, desired: &ObjectMeta) -> bool {
    let owners = existing.owner_references.as_deref().unwrap_or_default();
    let ours = desired
        .owner_references
        .iter()
        .flatten()
        .any(|want| owners.iter().any(|o| o.uid == want.uid));
    if ours {
        return true;
    }
    if owners.iter().any(|o| o.controller == Some(true)) {
        return false;
    }
    fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(key))
            .map(String::as_str)
    }
    let owner_labels: Vec<&str> = [VOICE_DEPLOYMENT_LABEL, PERSONA_LABEL]
        .into_iter()
        .filter(|k| label(desired, k).is_some())
        .collect();
    label(existing, "app.kubernetes.io/managed-by") == Some(MANAGED_BY)
        && !owner_labels.is_empty()
        && owner_labels
            .iter()
            .all(|k| label(existing, k) == label(desired, k))
}

/// `Some("Kind name")` when an object named like `desired` exists and the operator
/// may not write it ([`may_write`]); `None` when it is absent or ours.
pub async fn foreign<K>(api: &Api<K>, desired: &K) -> Result<Option<String>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    Ok(api
        .get_opt(&name)
        .await?
        .filter(|existing| !may_write(existing.meta(), desired.meta()))
        .map(|_| format!("{} {name}", K::kind(&()))))
}

/// [`foreign`], answered from the owned-object cache when it holds the object (no
/// GET). A miss still reads the API: a same-named object without the operator's
/// labels is invisible to its watches.
pub async fn foreign_observed<K>(
    api: &Api<K>,
    desired: &K,
    observed: &Observed,
) -> Result<Option<String>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    match observed.meta(&ObjKey::of::<K>(desired.meta())) {
        Some(existing) => Ok((!may_write(&existing, desired.meta())).then(|| {
            format!(
                "{} {}",
                K::kind(&()),
                desired.meta().name.as_deref().unwrap_or_default()
            )
        })),
        None => foreign(api, desired).await,
    }
}

/// [`apply`] unless the owned-object cache shows `obj` exactly as this process last
/// applied it and unchanged since ([`Observed::unchanged`]). `Some` with the result
/// when written, `None` when skipped; counted in `operator_applies_total`.
pub async fn apply_changed<K>(
    api: &Api<K>,
    obj: &K,
    observed: &Observed,
    metrics: &Metrics,
) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let key = ObjKey::of::<K>(obj.meta());
    let desired = digest(obj);
    let kind = K::kind(&());
    if observed.unchanged(&key, desired) {
        metrics.applied(&kind, false);
        return Ok(None);
    }
    let result = apply(api, obj).await?;
    observed.applied(key, desired, result.meta());
    metrics.applied(&kind, true);
    Ok(Some(result))
}

/// Server-side apply `obj` (forcing field ownership: the operator is the single writer
/// of what it manages; call [`foreign`] first). A no-op apply leaves the object and
/// its resourceVersion alone.
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn owner(uid: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "callmeback.dev/v1alpha1".into(),
            kind: "VoiceDeployment".into(),
            name: "desk".into(),
            uid: uid.into(),
            controller: Some(controller),
            block_owner_deletion: Some(true),
        }
    }

    fn meta(owners: Vec<OwnerReference>, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some("desk".into()),
            owner_references: (!owners.is_empty()).then_some(owners),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            )
            .filter(|l| !l.is_empty()),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn only_owned_objects_and_our_own_orphans_may_be_written() {
        // Proves the adoption rule: our owner reference or our orphan labels, never someone else's object.
        let ours_labels = [
            ("app.kubernetes.io/managed-by", MANAGED_BY),
            (VOICE_DEPLOYMENT_LABEL, "desk"),
        ];
        let desired = meta(vec![owner("uid-1", true)], &ours_labels);
        assert!(may_write(&meta(vec![owner("uid-1", true)], &[]), &desired));
        // Someone's plain Service, or one labelled like ours but controlled by another owner.
        assert!(!may_write(&meta(vec![], &[("team", "db")]), &desired));
        assert!(!may_write(
            &meta(vec![owner("uid-2", true)], &ours_labels),
            &desired
        ));
        // An orphan left by --cascade=orphan is ours again; one naming another deployment is not.
        assert!(may_write(&meta(vec![], &ours_labels), &desired));
        let other = [
            ("app.kubernetes.io/managed-by", MANAGED_BY),
            (VOICE_DEPLOYMENT_LABEL, "other"),
        ];
        assert!(!may_write(&meta(vec![], &other), &desired));
        // The label alone without managed-by is not enough.
        assert!(!may_write(
            &meta(vec![], &[(VOICE_DEPLOYMENT_LABEL, "desk")]),
            &desired
        ));
    }
}
