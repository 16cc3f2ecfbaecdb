//! What the operator last saw of the objects it owns, and what it last applied to
//! them, so that a reconcile writes (and reads) only what changed.
//!
//! Every owned kind is watched by label (`app.kubernetes.io/managed-by`); the
//! watches that trigger VoiceDeployment reconciles also feed [`Observed::observe`].
//! A reconcile then:
//! - checks ownership against the cached metadata instead of a GET per object (an
//!   object missing from the cache may still exist without our labels, so a miss
//!   falls back to a GET: see [`crate::reconcile::foreign`]);
//! - skips the server-side apply of an object whose desired form is the one it last
//!   applied and that nobody changed since: the same `generation`, labels,
//!   annotations and owners for kinds with a spec generation (their status
//!   updates do not count as changes), the same `resourceVersion` for the others.
//!   Anything else, including an edit by someone else, is applied again, so drift
//!   is still put back.
//!
//! The cache lags the API server by a watch event. A lag can only cause an extra,
//! harmless apply (the object is not yet seen as applied) or a delayed delete (an
//! object created a moment ago is not yet seen): its watch event then triggers the
//! reconcile that finishes the job.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::Event;
use serde::Serialize;

/// One object: kind, namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjKey {
    kind: String,
    namespace: String,
    name: String,
}

impl ObjKey {
    /// The key of a `K` with this metadata.
    pub fn of<K: Resource<DynamicType = ()>>(meta: &ObjectMeta) -> Self {
        Self {
            kind: K::kind(&()).into_owned(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// The key of `kind`/`namespace`/`name`.
    pub fn new<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> Self {
        Self {
            kind: K::kind(&()).into_owned(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// What identifies one state of an object, for "has anyone changed it".
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    resource_version: Option<String>,
    generation: Option<i64>,
    /// Digest of labels, annotations and owner references (what a generation does
    /// not cover).
    meta_digest: u64,
}

impl Version {
    fn of(meta: &ObjectMeta) -> Self {
        let mut h = DefaultHasher::new();
        meta.labels.hash(&mut h);
        meta.annotations.hash(&mut h);
        for o in meta.owner_references.iter().flatten() {
            (&o.uid, &o.kind, &o.name, o.controller).hash(&mut h);
        }
        Self {
            resource_version: meta.resource_version.clone(),
            generation: meta.generation,
            meta_digest: h.finish(),
        }
    }

    /// Whether `self` (seen now) is still the state `applied` left.
    fn unchanged_since(&self, applied: &Version) -> bool {
        match (self.generation, applied.generation) {
            (Some(now), Some(then)) => now == then && self.meta_digest == applied.meta_digest,
            _ => {
                applied.resource_version.is_some()
                    && self.resource_version == applied.resource_version
            }
        }
    }
}

/// Digest of a desired object as it would be sent.
pub fn digest<T: Serialize>(obj: &T) -> u64 {
    let mut h = DefaultHasher::new();
    // Serialization of the operator's own objects cannot fail; a failure only
    // makes the digest differ, i.e. the object is applied.
    serde_json::to_vec(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

#[derive(Default)]
struct Inner {
    /// Metadata (without managed fields) of every owned object the watches see.
    seen: HashMap<ObjKey, ObjectMeta>,
    /// What this process last applied: the desired digest and the state it left.
    applied: HashMap<ObjKey, (u64, Version)>,
    /// Per kind, the keys listed so far by a relist in progress.
    relisting: HashMap<String, HashSet<ObjKey>>,
}

/// The owned-object cache (see the module docs).
#[derive(Default)]
pub struct Observed {
    inner: Mutex<Inner>,
}

impl Observed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds one watch event of an owned kind (full objects or metadata only).
    pub fn observe<K: Resource<DynamicType = ()>>(&self, event: &Event<K>) {
        let kind = K::kind(&()).into_owned();
        let mut inner = self.lock();
        let stripped = |o: &K| {
            let mut meta = o.meta().clone();
            meta.managed_fields = None;
            meta
        };
        match event {
            Event::Apply(o) => {
                inner.seen.insert(ObjKey::of::<K>(o.meta()), stripped(o));
            }
            Event::Delete(o) => {
                let key = ObjKey::of::<K>(o.meta());
                inner.seen.remove(&key);
                inner.applied.remove(&key);
            }
            Event::Init => {
                inner.relisting.insert(kind, HashSet::new());
            }
            Event::InitApply(o) => {
                let key = ObjKey::of::<K>(o.meta());
                inner.seen.insert(key.clone(), stripped(o));
                inner.relisting.entry(kind).or_default().insert(key);
            }
            Event::InitDone => {
                // Whatever the relist did not return is gone (deleted while the
                // watch was down, when no Delete event could arrive).
                let listed = inner.relisting.remove(&kind).unwrap_or_default();
                inner
                    .seen
                    .retain(|k, _| k.kind != kind || listed.contains(k));
                inner
                    .applied
                    .retain(|k, _| k.kind != kind || listed.contains(k));
            }
        }
    }

    /// The cached metadata of `key`, if the watches have seen it.
    pub fn meta(&self, key: &ObjKey) -> Option<ObjectMeta> {
        self.lock().seen.get(key).cloned()
    }

    /// Whether `key` is, as far as the watches show, exactly what this process last
    /// applied with a desired object of digest `desired`.
    pub fn unchanged(&self, key: &ObjKey, desired: u64) -> bool {
        let inner = self.lock();
        match (inner.applied.get(key), inner.seen.get(key)) {
            (Some((applied_digest, applied)), Some(seen)) => {
                *applied_digest == desired && Version::of(seen).unchanged_since(applied)
            }
            _ => false,
        }
    }

    /// Records an apply of a desired object of digest `desired` that left the
    /// object with metadata `result`.
    pub fn applied(&self, key: ObjKey, desired: u64, result: &ObjectMeta) {
        self.lock()
            .applied
            .insert(key, (desired, Version::of(result)));
    }

    /// Objects seen and objects recorded as applied (for tests and metrics).
    pub fn sizes(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.seen.len(), inner.applied.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::collections::BTreeMap;

    fn meta(name: &str, rv: &str, generation: Option<i64>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            resource_version: Some(rv.into()),
            generation,
            ..ObjectMeta::default()
        }
    }

    fn deployment(rv: &str, generation: i64) -> Deployment {
        Deployment {
            metadata: meta("desk", rv, Some(generation)),
            ..Deployment::default()
        }
    }

    fn config_map(rv: &str) -> ConfigMap {
        ConfigMap {
            metadata: meta("desk-config", rv, None),
            ..ConfigMap::default()
        }
    }

    // A status update (new resourceVersion, same generation) is not a change; a spec
    // edit (new generation) or a label edit by someone else is.
    #[test]
    fn kinds_with_a_generation_change_by_generation_and_metadata_not_status() {
        let o = Observed::default();
        let key = ObjKey::new::<Deployment>("ns", "desk");
        let applied = deployment("10", 3);
        o.applied(key.clone(), 42, &applied.metadata);
        assert!(!o.unchanged(&key, 42), "not seen yet: apply");
        o.observe(&Event::Apply(applied));
        assert!(o.unchanged(&key, 42));
        assert!(!o.unchanged(&key, 43), "a new desired form is applied");
        o.observe(&Event::Apply(deployment("11", 3)));
        assert!(o.unchanged(&key, 42), "status-only update");
        o.observe(&Event::Apply(deployment("12", 4)));
        assert!(!o.unchanged(&key, 42), "someone edited the spec");
        let mut relabelled = deployment("13", 3);
        relabelled.metadata.labels = Some(BTreeMap::from([("x".into(), "y".into())]));
        o.observe(&Event::Apply(relabelled));
        assert!(!o.unchanged(&key, 42), "someone edited the labels");
    }

    #[test]
    fn kinds_without_a_generation_change_by_resource_version() {
        let o = Observed::default();
        let key = ObjKey::new::<ConfigMap>("ns", "desk-config");
        o.applied(key.clone(), 7, &config_map("5").metadata);
        o.observe(&Event::Apply(config_map("5")));
        assert!(o.unchanged(&key, 7));
        o.observe(&Event::Apply(config_map("6")));
        assert!(!o.unchanged(&key, 7));
    }

    // A relist forgets what it did not return (deleted while the watch was down), of
    // its own kind only; a Delete forgets at once.
    #[test]
    fn relists_and_deletes_forget_objects_that_are_gone() {
        let o = Observed::default();
        let kept = ObjKey::new::<ConfigMap>("ns", "desk-config");
        o.observe(&Event::Apply(config_map("1")));
        o.observe(&Event::Apply(deployment("2", 1)));
        let mut gone = config_map("3");
        gone.metadata.name = Some("old-config".into());
        o.observe(&Event::Apply(gone.clone()));
        o.applied(ObjKey::of::<ConfigMap>(&gone.metadata), 1, &gone.metadata);
        o.observe(&Event::<ConfigMap>::Init);
        o.observe(&Event::InitApply(config_map("1")));
        o.observe(&Event::<ConfigMap>::InitDone);
        assert!(o.meta(&kept).is_some());
        assert!(o.meta(&ObjKey::of::<ConfigMap>(&gone.metadata)).is_none());
        assert!(
            o.meta(&ObjKey::new::<Deployment>("ns", "desk")).is_some(),
            "other kinds are untouched by a ConfigMap relist"
        );
        assert_eq!(o.sizes(), (2, 0));
        o.observe(&Event::Delete(deployment("4", 1)));
        assert_eq!(o.sizes(), (1, 0));
    }

    #[test]
    fn digests_tell_desired_forms_apart() {
        let a = config_map("1");
        let mut b = a.clone();
        b.data = Some(BTreeMap::from([("k".into(), "v".into())]));
        assert_eq!(digest(&a), digest(&a.clone()));
        assert_ne!(digest(&a), digest(&b));
    }
}
