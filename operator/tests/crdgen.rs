//! The committed CRDs under `crds/` are exactly what `voice-operator crdgen` writes,
//! and the generated schema carries what kubectl needs (scale, map-keyed conditions,
//! printer columns, CEL rules).

use std::path::PathBuf;

use voice_operator::crdgen;

#[test]
fn committed_crds_match_generated() {
    // Proves crds/*.yaml are current; run `cargo run -p voice-operator -- crdgen` to refresh.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (name, generated) in crdgen::files().unwrap() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|_| {
            panic!("crds/{name} missing: run `cargo run -p voice-operator -- crdgen`")
        });
        assert!(
            committed == generated,
            "crds/{name} is stale: run `cargo run -p voice-operator -- crdgen`"
        );
    }
}

#[test]
fn generated_crds_declare_subresources_columns_and_map_conditions() {
    // Proves the schema features kubectl and server-side apply rely on are present.
    for (_, crd) in crdgen::crds() {
        let json = serde_json::to_value(&crd).unwrap();
        let version = &json["spec"]["versions"][0];
        assert_eq!(json["spec"]["names"]["categories"][0], "voice");
        assert!(version["subresources"]["status"].is_object());
        let conditions = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
            ["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{}",
            crd.spec.names.kind
        );
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(columns.contains(&"Age"));
    }
    let vd =
        serde_json::to_value(<callmeback_api::VoiceDeployment as kube::CustomResourceExt>::crd())
            .unwrap();
    let scale = &vd["spec"]["versions"][0]["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    let rules = vd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
        .as_array()
        .unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["message"] == "defaultPersona must be one of personas")
    );
}
