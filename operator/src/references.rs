//! Which VoiceDeployments a Persona or a Secret event concerns, by index.
//!
//! The controller maps every Persona and Secret event to the VoiceDeployments to
//! reconcile. Scanning all VoiceDeployments (and re-parsing each one's label
//! selector) per event made one Persona edit cost O(VoiceDeployments); with this
//! index it costs the VoiceDeployments that name the Persona plus those in its
//! namespace that select by label (selectors parsed once, when the VoiceDeployment
//! changes). The index follows the same watch events as the VoiceDeployment cache
//! ([`References::observe`]), relists included.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use callmeback_api::{Persona, VoiceDeployment};

type VdRef = ObjectRef<VoiceDeployment>;
/// (namespace, name) of a Persona or Secret.
type Key = (String, String);

/// What one VoiceDeployment references, as indexed.
struct Entry {
    ns: String,
    personas: Vec<String>,
    selects: bool,
    secret: String,
}

#[derive(Default)]
struct Index {
    entries: HashMap<VdRef, Entry>,
    by_persona: HashMap<Key, HashSet<VdRef>>,
    /// Per namespace, the VoiceDeployments with a `personaSelector`, parsed. An
    /// unparsable selector selects nothing (the reconcile reports it).
    selecting: HashMap<String, HashMap<VdRef, Option<Selector>>>,
    by_secret: HashMap<Key, HashSet<VdRef>>,
}

impl Index {
    fn insert(&mut self, vd: &VoiceDeployment) {
        let r = ObjectRef::from_obj(vd);
        self.remove(&r);
        let ns = vd.namespace().unwrap_or_default();
        // Named personas and the ones it still serves (a persona relabelled out of a
        // selector or deleted must leave its ConfigMap now, not at the next resync).
        let mut personas: Vec<String> = vd.spec.personas.iter().flatten().cloned().collect();
        if let Some(status) = &vd.status {
            personas.extend(status.personas.iter().map(|p| p.name.clone()));
        }
        personas.sort();
        personas.dedup();
        for p in &personas {
            self.by_persona
                .entry((ns.clone(), p.clone()))
                .or_default()
                .insert(r.clone());
        }
        let selects = vd.spec.persona_selector.is_some();
        if let Some(sel) = &vd.spec.persona_selector {
            self.selecting
                .entry(ns.clone())
                .or_default()
                .insert(r.clone(), Selector::try_from(sel.clone()).ok());
        }
        let secret = vd.spec.secret_ref.name.clone();
        self.by_secret
            .entry((ns.clone(), secret.clone()))
            .or_default()
            .insert(r.clone());
        self.entries.insert(
            r,
            Entry {
                ns,
                personas,
                selects,
                secret,
            },
        );
    }

    fn remove(&mut self, r: &VdRef) {
        let Some(e) = self.entries.remove(r) else {
            return;
        };
        for p in e.personas {
            remove_from(&mut self.by_persona, (e.ns.clone(), p), r);
        }
        if e.selects
            && let Some(set) = self.selecting.get_mut(&e.ns)
        {
            set.remove(r);
            if set.is_empty() {
                self.selecting.remove(&e.ns);
            }
        }
        remove_from(&mut self.by_secret, (e.ns, e.secret), r);
    }
}

fn remove_from(map: &mut HashMap<Key, HashSet<VdRef>>, key: Key, r: &VdRef) {
    if let Some(set) = map.get_mut(&key) {
        set.remove(r);
        if set.is_empty() {
            map.remove(&key);
        }
    }
}

/// The index, shared by the VoiceDeployment watch (writer) and the mappers (readers).
#[derive(Default)]
pub struct References {
    index: RwLock<Index>,
    /// A relist in progress: the objects seen since `Init`, swapped in at `InitDone`.
    relist: RwLock<Option<Index>>,
}

impl References {
    /// Follows one VoiceDeployment watch event.
    pub fn observe(&self, event: &watcher::Event<VoiceDeployment>) {
        match event {
            watcher::Event::Apply(vd) => self.write().insert(vd),
            watcher::Event::Delete(vd) => self.write().remove(&ObjectRef::from_obj(vd)),
            watcher::Event::Init => *self.relisting() = Some(Index::default()),
            watcher::Event::InitApply(vd) => {
                if let Some(next) = self.relisting().as_mut() {
                    next.insert(vd);
                }
            }
            watcher::Event::InitDone => {
                if let Some(next) = self.relisting().take() {
                    *self.write() = next;
                }
            }
        }
    }

    /// VoiceDeployments in the persona's namespace that name it, serve it, or
    /// select it by label.
    pub fn using_persona(&self, persona: &Persona) -> Vec<VdRef> {
        let ns = persona.namespace().unwrap_or_default();
        let index = self.read();
        let mut out: HashSet<VdRef> = index
            .by_persona
            .get(&(ns.clone(), persona.name_any()))
            .cloned()
            .unwrap_or_default();
        if let Some(selecting) = index.selecting.get(&ns) {
            out.extend(
                selecting
                    .iter()
                    .filter(|(_, sel)| sel.as_ref().is_some_and(|s| s.matches(persona.labels())))
                    .map(|(r, _)| r.clone()),
            );
        }
        out.into_iter().collect()
    }

    /// VoiceDeployments in the Secret's namespace that reference it.
    pub fn using_secret(&self, ns: &str, name: &str) -> Vec<VdRef> {
        self.read()
            .by_secret
            .get(&(ns.to_string(), name.to_string()))
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Indexed VoiceDeployments.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn relisting(&self) -> std::sync::RwLockWriteGuard<'_, Option<Index>> {
        self.relist.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vd(
        ns: &str,
        name: &str,
        personas: &[&str],
        selector: Option<&str>,
        secret: &str,
    ) -> VoiceDeployment {
        let mut spec = serde_json::json!({
            "personas": personas,
            "secretRef": { "name": secret },
            "publicUrl": "https://voice.example.com",
        });
        if let Some(app) = selector {
            spec["personaSelector"] = serde_json::json!({ "matchLabels": { "app": app } });
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "callmeback.dev/v1alpha1",
            "kind": "VoiceDeployment",
            "metadata": { "name": name, "namespace": ns },
            "spec": spec,
        }))
        .expect("a valid VoiceDeployment")
    }

    fn persona(ns: &str, name: &str, app: Option<&str>) -> Persona {
        let labels = app
            .map(|a| serde_json::json!({ "app": a }))
            .unwrap_or_default();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "callmeback.dev/v1alpha1",
            "kind": "Persona",
            "metadata": { "name": name, "namespace": ns, "labels": labels },
            "spec": {
                "displayName": "Sam",
                "systemPrompt": "You are Sam.",
                "greeting": "Hi!",
                "voice": { "voiceId": "v" },
            },
        }))
        .expect("a valid Persona")
    }

    fn names(mut refs: Vec<VdRef>) -> Vec<String> {
        refs.sort_by(|a, b| a.name.cmp(&b.name));
        refs.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn a_persona_maps_to_deployments_naming_or_selecting_it_in_its_namespace_only() {
        let refs = References::default();
        refs.observe(&watcher::Event::Apply(vd(
            "a",
            "names",
            &["sam"],
            None,
            "keys",
        )));
        refs.observe(&watcher::Event::Apply(vd(
            "a",
            "selects",
            &[],
            Some("desk"),
            "keys",
        )));
        refs.observe(&watcher::Event::Apply(vd(
            "a",
            "other",
            &["kim"],
            None,
            "keys",
        )));
        refs.observe(&watcher::Event::Apply(vd(
            "b",
            "elsewhere",
            &["sam"],
            Some("desk"),
            "keys",
        )));
        assert_eq!(
            names(refs.using_persona(&persona("a", "sam", Some("desk")))),
            ["names", "selects"]
        );
        assert_eq!(
            names(refs.using_persona(&persona("a", "sam", None))),
            ["names"]
        );
        assert_eq!(
            names(refs.using_persona(&persona("a", "kim", None))),
            ["other"]
        );
        assert_eq!(
            names(refs.using_secret("a", "keys")),
            ["names", "other", "selects"]
        );
        assert!(refs.using_secret("c", "keys").is_empty());
    }

    #[test]
    fn an_update_or_delete_drops_the_old_references() {
        let refs = References::default();
        refs.observe(&watcher::Event::Apply(vd(
            "a",
            "desk",
            &["sam"],
            Some("x"),
            "old",
        )));
        refs.observe(&watcher::Event::Apply(vd(
            "a",
            "desk",
            &["kim"],
            None,
            "new",
        )));
        assert!(
            refs.using_persona(&persona("a", "sam", Some("x")))
                .is_empty()
        );
        assert!(refs.using_secret("a", "old").is_empty());
        assert_eq!(names(refs.using_secret("a", "new")), ["desk"]);
        refs.observe(&watcher::Event::Delete(vd(
            "a",
            "desk",
            &["kim"],
            None,
            "new",
        )));
        assert!(refs.using_persona(&persona("a", "kim", None)).is_empty());
        assert!(refs.is_empty());
    }

    #[test]
    fn a_relist_replaces_the_index_only_when_it_completes() {
        let refs = References::default();
        refs.observe(&watcher::Event::Apply(vd(
            "a",
            "gone",
            &["sam"],
            None,
            "keys",
        )));
        refs.observe(&watcher::Event::Init);
        refs.observe(&watcher::Event::InitApply(vd(
            "a",
            "kept",
            &["sam"],
            None,
            "keys",
        )));
        // Mid-relist the old view still answers.
        assert_eq!(
            names(refs.using_persona(&persona("a", "sam", None))),
            ["gone"]
        );
        refs.observe(&watcher::Event::InitDone);
        assert_eq!(
            names(refs.using_persona(&persona("a", "sam", None))),
            ["kept"]
        );
        assert_eq!(refs.len(), 1);
    }

    #[test]
    fn a_served_persona_still_maps_after_it_left_the_spec() {
        let refs = References::default();
        let mut desk = vd("a", "desk", &[], None, "keys");
        desk.status = serde_json::from_value(serde_json::json!({
            "personas": [{ "name": "sam", "servedGeneration": 1, "currentGeneration": 1, "valid": true }]
        }))
        .ok();
        refs.observe(&watcher::Event::Apply(desk));
        assert_eq!(
            names(refs.using_persona(&persona("a", "sam", None))),
            ["desk"]
        );
    }
}
