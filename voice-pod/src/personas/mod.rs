//! The persona directory and the inbound routes, hot-reloaded.
//!
//! [`Personas`] holds the current [`PersonaSet`] behind an `RwLock<Arc<_>>`: readers
//! clone the `Arc` (a snapshot) and never see a half-applied reload; a call keeps
//! the `Arc<PersonaSpec>` it started with, so editing a persona never changes a call
//! in progress. [`Personas::rescan`] rereads the directory and swaps in a new set
//! only when something changed; a file that fails to parse is reported once (log +
//! `voice_persona_reload_errors_total`) and its last good version stays.
//!
//! ## Layout
//! - [`load`]: parsing and checking one file.
//! - [`watch`]: file notifications plus a periodic rescan (ConfigMap volumes swap a
//!   `..data` symlink, which watchers can miss).

pub mod load;
pub mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use callmeback_api::PersonaSpec;

use crate::metrics::Metrics;
pub use load::{LoadError, PersonaFile, Routes};

/// One consistent view of personas and routes.
#[derive(Debug, Default)]
pub struct PersonaSet {
    personas: BTreeMap<String, Arc<PersonaSpec>>,
    routes: Routes,
    /// Whether a routes file exists (without one, a single persona is the default).
    routes_file_present: bool,
}

impl PersonaSet {
    /// A set from parts (tests, and the loader).
    pub fn new(personas: BTreeMap<String, Arc<PersonaSpec>>, routes: Option<Routes>) -> Self {
        Self {
            personas,
            routes_file_present: routes.is_some(),
            routes: routes.unwrap_or_default(),
        }
    }

    /// The persona called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<PersonaSpec>> {
        self.personas.get(name).cloned()
    }

    /// Persona names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.personas.keys().map(String::as_str)
    }

    /// Number of personas.
    pub fn len(&self) -> usize {
        self.personas.len()
    }

    /// True when no persona is loaded.
    pub fn is_empty(&self) -> bool {
        self.personas.is_empty()
    }

    /// The routes in effect.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The default persona: `routes.default`, or the only persona when there is no
    /// routes file.
    pub fn default_persona(&self) -> Option<&str> {
        match (&self.routes.default, self.routes_file_present) {
            (Some(d), _) => Some(d.as_str()),
            (None, false) if self.personas.len() == 1 => {
                self.personas.keys().next().map(String::as_str)
            }
            _ => None,
        }
    }

    /// The persona answering calls to `to`: its route, else the default. `None`
    /// when neither exists or the routed persona is not loaded.
    pub fn route(&self, to: &str) -> Option<(String, Arc<PersonaSpec>)> {
        let name = self
            .routes
            .numbers
            .get(to)
            .map(String::as_str)
            .or_else(|| self.default_persona())?;
        self.get(name).map(|p| (name.to_string(), p))
    }

    /// The longest `maxCallDurationSeconds` (the default drain deadline).
    pub fn longest_max_call_duration(&self) -> Option<Duration> {
        self.personas
            .values()
            .map(|p| Duration::from_secs(u64::from(p.max_call_duration_seconds)))
            .max()
    }

    fn same_as(&self, other: &PersonaSet) -> bool {
        self.routes == other.routes
            && self.routes_file_present == other.routes_file_present
            && self.personas.len() == other.personas.len()
            && self
                .personas
                .iter()
                .zip(other.personas.iter())
                .all(|((a, pa), (b, pb))| a == b && (Arc::ptr_eq(pa, pb) || pa == pb))
    }
}

/// What the loader remembers about one file between scans.
struct FileState {
    /// The bytes last read, to skip unchanged files.
    content: Vec<u8>,
    /// The last version that parsed, if any.
    last_good: Option<(String, Arc<PersonaSpec>)>,
}

#[derive(Default)]
struct LoaderState {
    files: BTreeMap<PathBuf, FileState>,
    routes_content: Option<Vec<u8>>,
    routes_last_good: Option<Routes>,
    dir_error_reported: bool,
    warned: Vec<String>,
}

/// What a rescan did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// The set was swapped.
    pub changed: bool,
    /// Newly reported errors (each broken version of a file is reported once).
    pub errors: usize,
}

/// The hot-reloaded persona registry.
pub struct Personas {
    current: RwLock<Arc<PersonaSet>>,
    state: Mutex<LoaderState>,
    dir: PathBuf,
    routes_file: PathBuf,
    metrics: Arc<Metrics>,
}

impl Personas {
    /// Loads the directory and routes file once. Errors are reported, not fatal: a
    /// pod with a broken persona still serves the others.
    pub fn load(
        dir: impl Into<PathBuf>,
        routes_file: impl Into<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let p = Self {
            current: RwLock::new(Arc::new(PersonaSet::default())),
            state: Mutex::new(LoaderState::default()),
            dir: dir.into(),
            routes_file: routes_file.into(),
            metrics,
        };
        p.rescan();
        p
    }

    /// The current set (a snapshot; later reloads do not change it).
    pub fn snapshot(&self) -> Arc<PersonaSet> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The persona directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The routes file.
    pub fn routes_file(&self) -> &Path {
        &self.routes_file
    }

    /// Rereads everything (blocking file IO: call from `spawn_blocking`) and swaps
    /// in a new set if anything changed.
    pub fn rescan(&self) -> ReloadReport {
        let mut state = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut report = ReloadReport::default();
        self.scan_dir(&mut state, &mut report);
        self.scan_routes(&mut state, &mut report);

        let mut personas: BTreeMap<String, Arc<PersonaSpec>> = BTreeMap::new();
        let mut owners: BTreeMap<String, &Path> = BTreeMap::new();
        let mut warnings = Vec::new();
        for (path, f) in &state.files {
            if let Some((name, spec)) = &f.last_good {
                if let Some(first) = owners.get(name) {
                    warnings.push(format!(
                        "persona {name:?} is defined by both {} and {}; using the first",
                        first.display(),
                        path.display()
                    ));
                    continue;
                }
                owners.insert(name.clone(), path);
                personas.insert(name.clone(), Arc::clone(spec));
            }
        }
        let next = PersonaSet::new(personas, state.routes_last_good.clone());
        if let Some(d) = &next.routes.default
            && next.get(d).is_none()
        {
            warnings.push(format!("routes: default persona {d:?} is not loaded"));
        }
        for (number, name) in &next.routes.numbers {
            if next.get(name).is_none() {
                warnings.push(format!(
                    "routes: number {} routes to persona {name:?}, which is not loaded",
                    crate::phone::mask_number(number)
                ));
            }
        }
        // Each distinct warning once, until it goes away.
        for w in &warnings {
            if !state.warned.contains(w) {
                tracing::warn!(warning = %w, "persona configuration");
            }
        }
        state.warned = warnings;

        let current = self.snapshot();
        if !current.same_as(&next) {
            let names: Vec<&str> = next.names().collect();
            tracing::info!(personas = ?names, default = ?next.default_persona(), routes = next.routes.numbers.len(), "personas loaded");
            self.metrics.personas_loaded.set(next.len() as i64);
            let next = Arc::new(next);
            match self.current.write() {
                Ok(mut g) => *g = next,
                Err(poisoned) => *poisoned.into_inner() = next,
            }
            report.changed = true;
        }
        report
    }

    fn reload_error(&self, report: &mut ReloadReport, path: &Path, err: &dyn std::fmt::Display) {
        tracing::error!(file = %path.display(), error = %err, "persona configuration rejected; keeping the last good version");
        self.metrics.persona_reload_errors.inc();
        report.errors += 1;
    }

    fn scan_dir(&self, state: &mut LoaderState, report: &mut ReloadReport) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => {
                state.dir_error_reported = false;
                e
            }
            Err(err) => {
                // Keep what we have: a missing directory mid-swap must not unload everyone.
                if !state.dir_error_reported {
                    self.reload_error(
                        report,
                        &self.dir,
                        &format!("cannot read the persona directory: {err}"),
                    );
                    state.dir_error_reported = true;
                }
                return;
            }
        };
        let mut seen = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // `..data`, `..2024_...` (ConfigMap internals) and editor dotfiles; and the
            // deployment's own files beside the personas (`_routes.yaml`,
            // `_prices.yaml`): no persona name can start with `_`.
            if file_name.starts_with('.') || file_name.starts_with('_') {
                continue;
            }
            let ext_ok = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| load::PERSONA_EXTENSIONS.contains(&e));
            // `is_file` follows symlinks, as ConfigMap keys are symlinks into `..data`.
            // The routes file may sit in the same directory; it is never a persona.
            if !ext_ok || !path.is_file() || path == self.routes_file {
                continue;
            }
            seen.push(path.clone());
            let content = match std::fs::read(&path) {
                Ok(c) => c,
                Err(err) => {
                    // Vanished between listing and reading (a swap): the next scan settles it.
                    tracing::debug!(file = %path.display(), error = %err, "persona file unreadable this scan");
                    continue;
                }
            };
            if state.files.get(&path).is_some_and(|f| f.content == content) {
                continue;
            }
            if content.iter().all(u8::is_ascii_whitespace) {
                // An editor's or `cp`'s write truncates first: an empty file is a write in
                // progress, not a deleted persona. Keep the last version; rescan later.
                continue;
            }
            let previous = state.files.remove(&path).and_then(|f| f.last_good);
            let parsed = std::str::from_utf8(&content)
                .map_err(|e| LoadError::Syntax(format!("not UTF-8: {e}")))
                .and_then(|text| load::parse_persona(&path, text));
            let last_good = match parsed {
                Ok(PersonaFile::Persona(name, spec)) => Some((name, Arc::new(spec))),
                Ok(PersonaFile::OtherKind(kind)) => {
                    tracing::debug!(file = %path.display(), kind = %kind, "not a Persona; skipped");
                    None
                }
                Err(err) => {
                    self.reload_error(report, &path, &err);
                    previous
                }
            };
            state.files.insert(path, FileState { content, last_good });
        }
        state.files.retain(|p, _| seen.contains(p));
    }

    fn scan_routes(&self, state: &mut LoaderState, report: &mut ReloadReport) {
        match std::fs::read(&self.routes_file) {
            Ok(content) => {
                if state.routes_content.as_ref() == Some(&content) {
                    return;
                }
                let parsed = std::str::from_utf8(&content)
                    .map_err(|e| LoadError::Syntax(format!("not UTF-8: {e}")))
                    .and_then(load::parse_routes);
                match parsed {
                    Ok(r) => state.routes_last_good = Some(r),
                    Err(err) => self.reload_error(report, &self.routes_file, &err),
                }
                state.routes_content = Some(content);
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                state.routes_content = None;
                state.routes_last_good = None;
            }
            Err(err) => {
                if state.routes_content.is_some() || state.routes_last_good.is_none() {
                    tracing::debug!(file = %self.routes_file.display(), error = %err, "routes file unreadable this scan");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, greeting: &str) {
        std::fs::write(
            dir.join(name),
            format!(
                "displayName: X\nsystemPrompt: p\ngreeting: {greeting}\nvoice:\n  voiceId: v1\n"
            ),
        )
        .unwrap();
    }

    #[test]
    fn single_persona_without_routes_is_the_default() {
        // Proves the "exactly one persona and no routes file" default rule.
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "ada.yaml", "hi");
        let p = Personas::load(
            d.path(),
            d.path().join("none.yaml"),
            Arc::new(Metrics::new()),
        );
        let s = p.snapshot();
        assert_eq!(s.default_persona(), Some("ada"));
        assert_eq!(s.route("+14155550100").unwrap().0, "ada");
        write(d.path(), "bob.yaml", "hey");
        p.rescan();
        assert_eq!(p.snapshot().default_persona(), None);
        assert!(p.snapshot().route("+14155550100").is_none());
    }

    #[test]
    fn a_file_caught_empty_mid_write_keeps_the_persona_and_is_no_error() {
        // Proves the truncate-then-write gap of an edit neither unloads the persona nor counts an error.
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        write(d.path(), "ada.yaml", "first");
        let p = Personas::load(d.path(), d.path().join("routes.yaml"), Arc::clone(&m));
        std::fs::write(d.path().join("ada.yaml"), "").unwrap();
        let report = p.rescan();
        assert_eq!(report.errors, 0);
        assert_eq!(p.snapshot().get("ada").unwrap().greeting, "first");
        assert_eq!(m.persona_reload_errors.get(), 0);
        write(d.path(), "ada.yaml", "second");
        assert!(p.rescan().changed);
        assert_eq!(p.snapshot().get("ada").unwrap().greeting, "second");
    }

    #[test]
    fn broken_edit_keeps_last_good_and_counts_once() {
        // Proves a broken file keeps its last good version and is reported once, not every scan.
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        write(d.path(), "ada.yaml", "first");
        let p = Personas::load(d.path(), d.path().join("routes.yaml"), Arc::clone(&m));
        let held = p.snapshot().get("ada").unwrap();
        std::fs::write(d.path().join("ada.yaml"), "greeting: [broken").unwrap();
        assert_eq!(
            p.rescan(),
            ReloadReport {
                changed: false,
                errors: 1
            }
        );
        assert_eq!(
            p.rescan(),
            ReloadReport {
                changed: false,
                errors: 0
            }
        );
        assert_eq!(m.persona_reload_errors.get(), 1);
        assert_eq!(p.snapshot().get("ada").unwrap().greeting, "first");
        write(d.path(), "ada.yaml", "second");
        assert!(p.rescan().changed);
        assert_eq!(p.snapshot().get("ada").unwrap().greeting, "second");
        assert_eq!(held.greeting, "first", "a held snapshot never changes");
    }

    #[test]
    fn the_operators_files_beside_the_personas_are_not_personas() {
        // Proves `_routes.yaml` and `_prices.yaml` in the persona directory (the operator's one-ConfigMap layout) are read as routes and skipped as personas.
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "ada.yaml", "a");
        let routes = d.path().join("_routes.yaml");
        std::fs::write(&routes, "default: ada\nnumbers: {}\n").unwrap();
        std::fs::write(d.path().join("_prices.yaml"), "[]\n").unwrap();
        let m = Arc::new(Metrics::new());
        let p = Personas::load(d.path(), &routes, Arc::clone(&m));
        let s = p.snapshot();
        assert_eq!(s.names().collect::<Vec<_>>(), ["ada"]);
        assert_eq!(s.route("+14155550100").unwrap().0, "ada");
        assert_eq!(m.persona_reload_errors.get(), 0);
    }

    #[test]
    fn routes_pick_personas_and_unknown_numbers_fall_back() {
        // Proves number routes, the default route, and "no default" rejection.
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "ada.yaml", "a");
        write(d.path(), "bob.yaml", "b");
        let routes = d.path().join("routes.yaml");
        std::fs::write(&routes, "default: ada\nnumbers:\n  \"+14155550199\": bob\n").unwrap();
        let p = Personas::load(d.path(), &routes, Arc::new(Metrics::new()));
        let s = p.snapshot();
        assert_eq!(s.route("+14155550199").unwrap().0, "bob");
        assert_eq!(s.route("+14155550100").unwrap().0, "ada");
        std::fs::write(&routes, "numbers:\n  \"+14155550199\": bob\n").unwrap();
        p.rescan();
        assert!(p.snapshot().route("+14155550100").is_none());
    }
}
