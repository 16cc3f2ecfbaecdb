//! Persona hot reload on a running pod: edits reach new calls without touching
//! calls in progress, broken files keep the last good version, and a Kubernetes
//! ConfigMap update (an atomic `..data` symlink swap) is picked up.

use std::path::Path;
use std::time::Duration;

use callmeback_tests::twilio_sim::{
    ProbeHandler, TestPod, TestPodOptions, eventually, persona_yaml,
};

const FROM: &str = "+14155550123";
const TO: &str = "+14155550100";
const T: Duration = Duration::from_secs(5);

async fn greeting_of_new_call(pod: &TestPod, probe: &ProbeHandler) -> String {
    let before = probe.calls().len();
    let (mut stream, _) = pod.sim().start_inbound_call(FROM, TO).await.unwrap();
    assert!(eventually(T, || async { probe.calls().len() > before }).await);
    stream.send_stop().await.unwrap();
    probe.calls()[before].ctx.persona.greeting.clone()
}

#[tokio::test]
async fn an_edit_reaches_new_calls_while_the_running_call_keeps_its_persona() {
    // Proves a running call holds the persona it started with while a new call gets the edited one.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("personas");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ada.yaml"), persona_yaml("Ada", "Version one.")).unwrap();
    let probe = ProbeHandler::new();
    let pod = TestPod::start(TestPodOptions {
        persona_dir: Some(dir.clone()),
        handler: Some(probe.clone()),
        ..TestPodOptions::default()
    })
    .await
    .unwrap();
    let (mut running, _) = pod.sim().start_inbound_call(FROM, TO).await.unwrap();
    assert!(eventually(T, || async { probe.calls().len() == 1 }).await);

    std::fs::write(dir.join("ada.yaml"), persona_yaml("Ada", "Version two.")).unwrap();
    assert!(
        eventually(T, || async {
            let before = probe.calls().len();
            let g = greeting_of_new_call(&pod, &probe).await;
            probe.calls().len() > before && g == "Version two."
        })
        .await
    );
    assert_eq!(
        probe.calls()[0].ctx.persona.greeting,
        "Version one.",
        "the running call keeps its snapshot"
    );
    running.send_stop().await.unwrap();
    assert!(eventually(T, || async { probe.calls()[0].ended }).await);
    assert_eq!(
        pod.metric("voice_persona_reload_errors_total", &[])
            .await
            .unwrap(),
        0.0
    );
}

#[tokio::test]
async fn a_broken_file_keeps_the_last_good_version_and_is_reported_once() {
    // Proves a broken edit is counted once, calls keep getting the last good persona, and a fix applies.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("personas");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ada.yaml"), persona_yaml("Ada", "Good one.")).unwrap();
    let probe = ProbeHandler::new();
    let pod = TestPod::start(TestPodOptions {
        persona_dir: Some(dir.clone()),
        handler: Some(probe.clone()),
        ..TestPodOptions::default()
    })
    .await
    .unwrap();
    // The pod loads its personas in its own task: break the file only once the good
    // version is in, or there would be no last good version to keep.
    assert_eq!(greeting_of_new_call(&pod, &probe).await, "Good one.");
    std::fs::write(
        dir.join("ada.yaml"),
        "displayName: Ada\ngreeting: [unclosed\n",
    )
    .unwrap();
    assert!(
        eventually(T, || async {
            pod.metric("voice_persona_reload_errors_total", &[])
                .await
                .unwrap()
                == 1.0
        })
        .await
    );
    // Several rescans later, still one report, still the good persona.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        pod.metric("voice_persona_reload_errors_total", &[])
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(greeting_of_new_call(&pod, &probe).await, "Good one.");
    assert_eq!(pod.metric("voice_personas_loaded", &[]).await.unwrap(), 1.0);

    std::fs::write(dir.join("ada.yaml"), persona_yaml("Ada", "Fixed.")).unwrap();
    assert!(
        eventually(T, || async {
            greeting_of_new_call(&pod, &probe).await == "Fixed."
        })
        .await
    );
}

/// Lays out a directory the way the kubelet projects a ConfigMap: the keys are
/// symlinks to `..data/<key>`, `..data` is a symlink to a timestamped directory.
fn configmap_write(root: &Path, version: &str, files: &[(&str, String)]) {
    let versioned = root.join(format!("..{version}"));
    std::fs::create_dir_all(&versioned).unwrap();
    for (name, body) in files {
        std::fs::write(versioned.join(name), body).unwrap();
        let link = root.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    // Atomic swap: a new symlink renamed over `..data`, then the old directory goes.
    let old = std::fs::read_link(root.join("..data")).ok();
    let tmp_link = root.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp_link).unwrap();
    std::fs::rename(&tmp_link, root.join("..data")).unwrap();
    if let Some(old) = old {
        std::fs::remove_dir_all(root.join(old)).unwrap();
    }
}

#[tokio::test]
async fn a_configmap_data_symlink_swap_is_picked_up() {
    // Proves a kubelet-style ConfigMap update (new ..data target, old dir deleted) reaches new calls.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("personas");
    std::fs::create_dir_all(&dir).unwrap();
    configmap_write(
        &dir,
        "2026_01_01_00_00_00.1",
        &[("ada.yaml", persona_yaml("Ada", "Before the swap."))],
    );
    let probe = ProbeHandler::new();
    let pod = TestPod::start(TestPodOptions {
        persona_dir: Some(dir.clone()),
        handler: Some(probe.clone()),
        ..TestPodOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(greeting_of_new_call(&pod, &probe).await, "Before the swap.");
    configmap_write(
        &dir,
        "2026_01_01_00_05_00.2",
        &[("ada.yaml", persona_yaml("Ada", "After the swap."))],
    );
    assert!(
        eventually(T, || async {
            greeting_of_new_call(&pod, &probe).await == "After the swap."
        })
        .await
    );
    assert_eq!(
        pod.metric("voice_persona_reload_errors_total", &[])
            .await
            .unwrap(),
        0.0
    );
    assert_eq!(
        pod.metric("voice_personas_loaded", &[]).await.unwrap(),
        1.0,
        "..data entries are not personas"
    );
}

#[tokio::test]
async fn routes_are_hot_reloaded_too() {
    // Proves editing routes.yaml re-routes new inbound calls without a restart.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("personas");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ada.yaml"), persona_yaml("Ada", "Ada here.")).unwrap();
    std::fs::write(dir.join("bob.yaml"), persona_yaml("Bob", "Bob here.")).unwrap();
    let routes = tmp.path().join("routes.yaml");
    std::fs::write(&routes, "default: ada\n").unwrap();
    let probe = ProbeHandler::new();
    let pod = TestPod::start(TestPodOptions {
        persona_dir: Some(dir),
        routes_file: Some(routes.clone()),
        handler: Some(probe.clone()),
        ..TestPodOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(greeting_of_new_call(&pod, &probe).await, "Ada here.");
    std::fs::write(
        &routes,
        format!("default: ada\nnumbers:\n  \"{TO}\": bob\n"),
    )
    .unwrap();
    assert!(
        eventually(T, || async {
            greeting_of_new_call(&pod, &probe).await == "Bob here."
        })
        .await
    );
}
