//! The chart ships the CRDs the operator generates, unchanged: the copies in
//! `charts/callmeback/files/crds/` and what `helm template` renders from them equal
//! the repository's `crds/` (written by `voice-operator crdgen`), except for the
//! labels and the `helm.sh/resource-policy` annotation the chart adds.

use std::collections::BTreeMap;
use std::path::Path;

use callmeback_tests::helm::{Helm, all_of, chart_dir, repo_root};
use serde_json::Value;

fn yaml_files(dir: &Path) -> BTreeMap<String, Value> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value =
                serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect()
}

/// Numbers as f64: Helm's fromYaml/toYaml turns `0.0` into `0`, the same number.
fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or(Value::Number(n)),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, normalize(v))).collect()),
        other => other,
    }
}

const FIX: &str = "run: cp crds/*.yaml charts/callmeback/files/crds/";

#[test]
fn chart_crd_files_are_identical_to_the_generated_crds() {
    // Proves files/crds/ holds exactly the generated CRDs, file for file.
    let generated = yaml_files(&repo_root().join("crds"));
    assert!(
        !generated.is_empty(),
        "crds/ is empty: run `cargo run -p voice-operator -- crdgen`"
    );
    let chart = yaml_files(&chart_dir().join("files/crds"));
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "chart CRD files differ from crds/: {FIX}"
    );
    for (name, crd) in &generated {
        assert_eq!(
            &chart[name], crd,
            "charts/callmeback/files/crds/{name} drifted from crds/{name}: {FIX}"
        );
    }
}

#[test]
fn rendered_chart_crds_equal_the_generated_crds_but_for_chart_metadata() {
    // Proves the templating (fromYaml/toYaml plus labels and the keep annotation)
    // changes nothing in the CRDs' spec: the schema the apiserver gets is crdgen's.
    let generated: BTreeMap<String, Value> = yaml_files(&repo_root().join("crds"))
        .into_values()
        .map(|v| {
            (
                v["metadata"]["name"].as_str().unwrap().to_string(),
                normalize(v),
            )
        })
        .collect();
    assert!(!generated.is_empty(), "crds/ is empty");
    let objs = Helm::new().unwrap().template("cmb", "voice", &[]).unwrap();
    let mut rendered: BTreeMap<String, Value> = BTreeMap::new();
    for crd in all_of(&objs, "CustomResourceDefinition") {
        let mut crd = crd.clone();
        let meta = crd["metadata"].as_object_mut().unwrap();
        assert_eq!(meta["annotations"]["helm.sh/resource-policy"], "keep");
        // Remove what the chart adds; anything else must be crdgen's.
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("helm.sh/resource-policy");
        }
        if let Some(l) = meta.get_mut("labels").and_then(Value::as_object_mut) {
            for k in [
                "app.kubernetes.io/part-of",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ] {
                l.remove(k);
            }
        }
        for k in ["annotations", "labels"] {
            if meta
                .get(k)
                .and_then(Value::as_object)
                .is_some_and(|m| m.is_empty())
            {
                meta.remove(k);
            }
        }
        rendered.insert(
            crd["metadata"]["name"].as_str().unwrap().to_string(),
            normalize(crd),
        );
    }
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>()
    );
    for (name, crd) in &generated {
        assert_eq!(
            &rendered[name], crd,
            "rendered CRD {name} differs from crds/: {FIX}"
        );
    }
}
