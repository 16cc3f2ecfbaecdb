//! Keeps [`Personas`] current: file notifications for speed, a periodic rescan for
//! certainty.
//!
//! Kubernetes updates a ConfigMap volume by writing a new timestamped directory and
//! atomically renaming the `..data` symlink to it. A watch on a directory reached
//! through that symlink keeps watching the old, deleted directory, so notifications
//! alone can miss updates; the rescan (cheap: a few small files, unchanged ones
//! compared byte for byte) guarantees an update lands within one interval.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Personas;

/// Notifications arriving within this window trigger one rescan.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Watches and rescans until `cancel` fires.
pub async fn run(personas: Arc<Personas>, interval: Duration, cancel: CancellationToken) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = start_watcher(&personas, tx);
    if watcher.is_none() {
        tracing::warn!(
            "file notifications unavailable; persona changes are picked up by the periodic rescan only"
        );
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the initial load already ran
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(()) = rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tick.tick() => {}
        }
        let p = Arc::clone(&personas);
        if let Err(err) = tokio::task::spawn_blocking(move || p.rescan()).await {
            tracing::error!(error = %err, "persona rescan task failed");
        }
    }
    drop(watcher);
}

fn start_watcher(personas: &Personas, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            // Full means a rescan is already pending.
            let _ = tx.try_send(());
        }
    })
    .ok()?;
    // The directory itself, its parent (where a ConfigMap's `..data` swap happens when
    // the directory is a key path inside the volume) and the routes file's directory.
    let mut paths: Vec<PathBuf> = vec![personas.dir().to_path_buf()];
    if let Some(parent) = personas.dir().parent() {
        paths.push(parent.to_path_buf());
    }
    if let Some(parent) = personas.routes_file().parent() {
        paths.push(parent.to_path_buf());
    }
    paths.sort();
    paths.dedup();
    let mut any = false;
    for p in paths {
        match watcher.watch(&p, RecursiveMode::NonRecursive) {
            Ok(()) => any = true,
            Err(err) => tracing::debug!(path = %p.display(), error = %err, "cannot watch"),
        }
    }
    any.then_some(watcher)
}
