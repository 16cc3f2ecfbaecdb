//! The Helm chart with real helm (4.1, from `scripts/helm-tools.sh`): lint and
//! template for the default values and every toggle, the schema rejecting typos,
//! and the properties the chart promises (restricted pods, leader election, RBAC
//! from the operator's rules file, CRDs kept on uninstall, alert thresholds).

use callmeback_tests::helm::{Helm, HelmError, all_of, chart_dir, find};
use serde_json::{Value, json};

/// Every values toggle, each alone, and all together.
const TOGGLES: &[&[(&str, &str)]] = &[
    &[],
    &[("monitoring.serviceMonitor.enabled", "true")],
    &[("monitoring.podMonitor.enabled", "true")],
    &[("monitoring.prometheusRule.enabled", "true")],
    &[("monitoring.dashboard.enabled", "true")],
    &[
        ("podDisruptionBudget.enabled", "true"),
        ("replicaCount", "2"),
    ],
    &[("crds.install", "false")],
    &[("crds.keep", "false")],
    &[
        ("rbac.create", "false"),
        ("serviceAccount.create", "false"),
        ("serviceAccount.name", "existing"),
    ],
    &[("leaderElection.leaseName", "voice-operator")],
    &[(
        "image.digest",
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    )],
    &[
        ("operator.watchNamespace", "voice"),
        ("operator.twilioApiUrl", "http://twilio.internal:8080"),
    ],
    &[("networkPolicy.enabled", "true")],
    &[
        ("networkPolicy.enabled", "true"),
        ("networkPolicy.voicePods.namespaces[0]", "calls-a"),
        ("networkPolicy.voicePods.namespaces[1]", "calls-b"),
        ("networkPolicy.operator.apiServerCidrs[0]", "10.0.0.1/32"),
    ],
    &[
        ("monitoring.serviceMonitor.enabled", "true"),
        ("monitoring.podMonitor.enabled", "true"),
        ("monitoring.prometheusRule.enabled", "true"),
        ("monitoring.dashboard.enabled", "true"),
        ("podDisruptionBudget.enabled", "true"),
        ("replicaCount", "3"),
    ],
];

fn helm() -> Helm {
    Helm::new().expect("helm and kubectl from scripts/helm-tools.sh")
}

fn operator_env(objects: &[Value], name: &str) -> Option<String> {
    let dep = all_of(objects, "Deployment").next()?;
    dep["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_string))
}

#[test]
fn helm_lint_passes_for_default_values_and_every_toggle() {
    // Proves `helm lint --strict` accepts the chart with each toggle on.
    let helm = helm();
    for sets in TOGGLES {
        helm.lint(sets)
            .unwrap_or_else(|e| panic!("helm lint with {sets:?} failed: {e}"));
    }
}

#[test]
fn helm_template_renders_exactly_the_objects_each_toggle_asks_for() {
    // Proves each toggle adds its object and nothing renders that was not asked for.
    let helm = helm();
    let count = |objs: &[Value], kind: &str| all_of(objs, kind).count();
    let crd_files = std::fs::read_dir(chart_dir().join("files/crds"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
                .count()
        })
        .unwrap_or(0);
    assert!(crd_files > 0, "charts/callmeback/files/crds/ holds no CRDs");

    let default = helm.template("cmb", "voice", &[]).unwrap();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        // The leader-election Lease rights (always on).
        "Role",
        "RoleBinding",
    ] {
        assert_eq!(count(&default, kind), 1, "default values render one {kind}");
    }
    assert_eq!(count(&default, "CustomResourceDefinition"), crd_files);
    for kind in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert_eq!(count(&default, kind), 0, "{kind} is off by default");
    }

    for (sets, kind) in [
        (
            &[("monitoring.serviceMonitor.enabled", "true")][..],
            "ServiceMonitor",
        ),
        (&[("monitoring.podMonitor.enabled", "true")], "PodMonitor"),
        (
            &[("monitoring.prometheusRule.enabled", "true")],
            "PrometheusRule",
        ),
        (&[("monitoring.dashboard.enabled", "true")], "ConfigMap"),
        (
            &[("podDisruptionBudget.enabled", "true")],
            "PodDisruptionBudget",
        ),
    ] {
        let objs = helm.template("cmb", "voice", sets).unwrap();
        assert_eq!(count(&objs, kind), 1, "{sets:?} renders one {kind}");
        assert_eq!(
            objs.len(),
            default.len() + 1,
            "{sets:?} adds only the {kind}"
        );
    }

    let no_crds = helm
        .template("cmb", "voice", &[("crds.install", "false")])
        .unwrap();
    assert_eq!(count(&no_crds, "CustomResourceDefinition"), 0);

    let no_rbac = helm
        .template(
            "cmb",
            "voice",
            &[
                ("rbac.create", "false"),
                ("serviceAccount.create", "false"),
                ("serviceAccount.name", "existing"),
            ],
        )
        .unwrap();
    for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
        assert_eq!(
            count(&no_rbac, kind),
            0,
            "{kind} not created when turned off"
        );
    }
    let dep = all_of(&no_rbac, "Deployment").next().unwrap();
    assert_eq!(
        dep["spec"]["template"]["spec"]["serviceAccountName"],
        "existing"
    );

    // Every object a namespaced kind renders lands in the release namespace.
    for o in &default {
        let cluster_scoped = [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
        ]
        .contains(&o["kind"].as_str().unwrap_or_default());
        if !cluster_scoped {
            assert_eq!(
                o["metadata"]["namespace"], "voice",
                "{} has the release namespace",
                o["kind"]
            );
        }
    }
}

#[test]
fn values_typos_are_rejected_by_the_schema_naming_the_key() {
    // Proves values.schema.json turns a misspelt or mistyped value into an error that
    // names it, instead of a silently ignored setting.
    let helm = helm();
    for (key, value, expect) in [
        ("monitoring.dashbord.enabled", "true", "dashbord"),
        ("crds.instal", "false", "instal"),
        ("replicaCount", "two", "replicaCount"),
        ("image.pullPolicy", "Sometimes", "pullPolicy"),
        (
            "monitoring.prometheusRule.turnLatency.for",
            "ten minutes",
            "for",
        ),
        ("operator.logFormat", "xml", "logFormat"),
        (
            "monitoring.prometheusRule.turnLatency.p95Seconds",
            "fast",
            "p95Seconds",
        ),
        ("leaderElecton.enabled", "true", "leaderElecton"),
    ] {
        match helm.template("cmb", "voice", &[(key, value)]) {
            Err(HelmError::Failed { stderr, .. }) => {
                assert!(
                    stderr.contains("schema"),
                    "{key}: not a schema error: {stderr}"
                );
                assert!(
                    stderr.contains(expect),
                    "{key}: error does not name {expect:?}: {stderr}"
                );
            }
            other => panic!("{key}={value} was accepted: {other:?}"),
        }
    }
}

#[test]
fn leader_election_is_on_at_any_replica_count_and_cannot_be_switched_off() {
    // Proves the operator always campaigns for the Lease (one replica too: a rolling
    // update runs the old and the new operator together), with its Lease rights and
    // a per-release Lease name, and that the removed switch is refused by the schema.
    let helm = helm();
    for replicas in ["1", "2"] {
        let objs = helm
            .template("cmb", "voice", &[("replicaCount", replicas)])
            .unwrap();
        assert_eq!(
            operator_env(&objs, "OPERATOR_LEADER_ELECTION").as_deref(),
            Some("true"),
            "{replicas} replicas"
        );
        assert!(find(&objs, "Role", "cmb-callmeback-leader-election").is_some());
    }
    let refused = helm
        .template("cmb", "voice", &[("leaderElection.enabled", "false")])
        .unwrap_err()
        .to_string();
    assert!(refused.contains("enabled"), "{refused}");
    let objs = helm.template("cmb", "voice", &[]).unwrap();
    assert_eq!(
        operator_env(&objs, "OPERATOR_LEASE_NAME").as_deref(),
        Some("cmb-callmeback-leader")
    );
    let dep = all_of(&objs, "Deployment").next().unwrap();
    let env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let e = env.iter().find(|e| e["name"] == name).unwrap();
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
}

#[test]
fn operator_pod_meets_the_restricted_pod_security_standard_with_probes() {
    // Proves every field the "restricted" Pod Security Standard checks, plus a
    // read-only root filesystem, and the health probes on port 8080.
    let objs = helm().template("cmb", "voice", &[]).unwrap();
    let pod = &all_of(&objs, "Deployment").next().unwrap()["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null());
    assert!(sc["privileged"].is_null() || sc["privileged"] == false);
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], c["ports"][0]["name"]);
    assert_eq!(c["args"], json!(["run"]));
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(
        c["image"],
        format!("ghcr.io/callmeback/voice-operator:{}", chart_app_version())
    );

    let svc = all_of(&objs, "Service").next().unwrap();
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(
        svc["spec"]["selector"],
        all_of(&objs, "Deployment").next().unwrap()["spec"]["selector"]["matchLabels"]
    );
}

fn chart_app_version() -> String {
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    chart["appVersion"].as_str().unwrap().to_string()
}

fn rules_file() -> Value {
    chart_file("files/operator-rules.yaml")
}

fn lease_rules_file() -> Value {
    chart_file("files/operator-leader-election-rules.yaml")
}

fn chart_file(path: &str) -> Value {
    let text = std::fs::read_to_string(chart_dir().join(path)).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

#[test]
fn cluster_role_grants_exactly_the_operator_rules_file() {
    // Proves the ClusterRole is the operator's rules file verbatim (the rules its own
    // tests run under), bound to the chart's ServiceAccount in the release namespace.
    let objs = helm().template("cmb", "voice", &[]).unwrap();
    let role = find(&objs, "ClusterRole", "cmb-callmeback").unwrap();
    assert_eq!(role["rules"], rules_file());
    let binding = find(&objs, "ClusterRoleBinding", "cmb-callmeback").unwrap();
    assert_eq!(binding["roleRef"]["name"], "cmb-callmeback");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "cmb-callmeback", "namespace": "voice"}])
    );
    // No wildcard anywhere: least privilege is spelled out.
    let all_rules: Vec<Value> = [rules_file(), lease_rules_file()]
        .iter()
        .flat_map(|r| r.as_array().unwrap().clone())
        .collect();
    for rule in &all_rules {
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(
                !rule[field].as_array().unwrap().iter().any(|v| v == "*"),
                "wildcard in {field}: {rule}"
            );
        }
    }
}

#[test]
fn watch_namespace_turns_the_operators_rbac_into_roles_in_that_namespace() {
    // Proves operator.watchNamespace grants the operator's rules as a Role in that namespace and nothing cluster-wide (no Secret read or Deployment write outside it), and the Lease rules only in the release namespace.
    let objs = helm()
        .template(
            "cmb",
            "voice",
            &[("operator.watchNamespace", "calls"), ("replicaCount", "2")],
        )
        .unwrap();
    assert_eq!(all_of(&objs, "ClusterRole").count(), 0);
    assert_eq!(all_of(&objs, "ClusterRoleBinding").count(), 0);
    let role = find(&objs, "Role", "cmb-callmeback").unwrap();
    assert_eq!(role["metadata"]["namespace"], "calls");
    assert_eq!(role["rules"], rules_file());
    let binding = find(&objs, "RoleBinding", "cmb-callmeback").unwrap();
    assert_eq!(binding["metadata"]["namespace"], "calls");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cmb-callmeback"})
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "cmb-callmeback", "namespace": "voice"}])
    );
    let lease = find(&objs, "Role", "cmb-callmeback-leader-election").unwrap();
    assert_eq!(lease["metadata"]["namespace"], "voice");
    assert_eq!(lease["rules"], lease_rules_file());
    let lease_binding = find(&objs, "RoleBinding", "cmb-callmeback-leader-election").unwrap();
    assert_eq!(lease_binding["metadata"]["namespace"], "voice");

    // Cluster-wide mode grants the same rules as a ClusterRole, the Lease still as a Role.
    let wide = helm().template("cmb", "voice", &[]).unwrap();
    assert_eq!(
        find(&wide, "ClusterRole", "cmb-callmeback").unwrap()["rules"],
        rules_file()
    );
    assert!(find(&wide, "Role", "cmb-callmeback").is_none());
    assert_eq!(
        find(&wide, "Role", "cmb-callmeback-leader-election").unwrap()["metadata"]["namespace"],
        "voice"
    );
    // Neither mode lets the operator grant or touch RBAC or nodes; pods it may only
    // read and patch (the load poller and the deletion-cost/eviction annotations),
    // never create or delete.
    for rule in rules_file().as_array().unwrap() {
        for res in rule["resources"].as_array().unwrap() {
            let res = res.as_str().unwrap();
            assert!(
                !["roles", "rolebindings", "clusterroles", "nodes"].contains(&res),
                "{rule}"
            );
            if res == "pods" {
                assert_eq!(
                    rule["verbs"],
                    json!(["get", "list", "watch", "patch"]),
                    "{rule}"
                );
            }
        }
    }
}

#[test]
fn network_policies_are_off_by_default_and_open_only_the_documented_ports() {
    // Proves the optional NetworkPolicies: voice pods take 8080 from the ingress controller's namespace and 9090 from monitoring and from the operator, reach only DNS and 443; the operator takes 8080 from monitoring and reaches DNS, the API ports and the voice pods' 9090.
    let objs = helm()
        .template(
            "cmb",
            "voice",
            &[
                ("networkPolicy.enabled", "true"),
                ("operator.watchNamespace", "calls"),
            ],
        )
        .unwrap();
    let pods = find(&objs, "NetworkPolicy", "cmb-callmeback-voice-pods").unwrap();
    assert_eq!(pods["metadata"]["namespace"], "calls");
    let spec = &pods["spec"];
    assert_eq!(
        spec["podSelector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "voice-pod", "app.kubernetes.io/managed-by": "callmeback-operator"})
    );
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
    let ingress = spec["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 3);
    assert_eq!(
        ingress[0]["ports"],
        json!([{"port": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        ingress[0]["from"][0]["namespaceSelector"],
        json!({"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}})
    );
    assert_eq!(
        ingress[1]["ports"],
        json!([{"port": 9090, "protocol": "TCP"}])
    );
    assert_eq!(
        ingress[1]["from"][0]["namespaceSelector"],
        json!({"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}})
    );
    // The operator reads each pod's /load on 9090 (call autoscaling).
    assert_eq!(
        ingress[2]["ports"],
        json!([{"port": 9090, "protocol": "TCP"}])
    );
    assert_eq!(
        ingress[2]["from"][0]["namespaceSelector"],
        json!({"matchLabels": {"kubernetes.io/metadata.name": "voice"}})
    );
    assert_eq!(
        spec["egress"],
        json!([
            {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
            {"ports": [{"port": 443, "protocol": "TCP"}]},
        ])
    );
    let op = find(&objs, "NetworkPolicy", "cmb-callmeback-operator").unwrap();
    assert_eq!(op["metadata"]["namespace"], "voice");
    assert_eq!(
        op["spec"]["podSelector"]["matchLabels"],
        all_of(&objs, "Deployment").next().unwrap()["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        op["spec"]["ingress"][0]["ports"],
        json!([{"port": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        op["spec"]["egress"][1]["ports"],
        json!([{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}])
    );
    let to_pods = op["spec"]["egress"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(to_pods["ports"], json!([{"port": 9090, "protocol": "TCP"}]));
    assert_eq!(
        to_pods["to"][0]["namespaceSelector"],
        json!({"matchLabels": {"kubernetes.io/metadata.name": "calls"}})
    );
}

#[test]
fn chart_readme_lists_every_resource_the_operator_may_touch() {
    // Proves the chart README's permission table names every resource in the rules file.
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).unwrap();
    let all_rules: Vec<Value> = [rules_file(), lease_rules_file()]
        .iter()
        .flat_map(|r| r.as_array().unwrap().clone())
        .collect();
    for rule in &all_rules {
        for res in rule["resources"].as_array().unwrap() {
            let res = res.as_str().unwrap();
            assert!(
                readme.contains(&format!("`{res}`")),
                "charts/callmeback/README.md does not list `{res}`"
            );
        }
    }
}

#[test]
fn crds_carry_keep_unless_told_otherwise() {
    // Proves CRDs survive `helm uninstall` by default and the policy can be turned off.
    let helm = helm();
    let kept = helm.template("cmb", "voice", &[]).unwrap();
    let crds: Vec<_> = all_of(&kept, "CustomResourceDefinition").collect();
    assert!(!crds.is_empty());
    for crd in &crds {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
        assert_eq!(
            crd["metadata"]["labels"]["app.kubernetes.io/part-of"],
            "callmeback"
        );
    }
    let not_kept = helm
        .template("cmb", "voice", &[("crds.keep", "false")])
        .unwrap();
    for crd in all_of(&not_kept, "CustomResourceDefinition") {
        assert!(crd["metadata"]["annotations"]["helm.sh/resource-policy"].is_null());
    }
}

#[test]
fn alert_thresholds_and_labels_come_from_values() {
    // Proves each alert's threshold and pending time follow values, and extra alert
    // labels reach every rule.
    let objs = helm()
        .template(
            "cmb",
            "voice",
            &[
                ("monitoring.prometheusRule.enabled", "true"),
                ("monitoring.prometheusRule.turnLatency.p95Seconds", "0.8"),
                ("monitoring.prometheusRule.turnLatency.for", "3m"),
                (
                    "monitoring.prometheusRule.socketErrors.ratePerSecond",
                    "0.5",
                ),
                ("monitoring.prometheusRule.callFailures.ratio", "0.2"),
                ("monitoring.prometheusRule.podSaturation.ratio", "0.5"),
                (
                    "monitoring.prometheusRule.reconcileErrors.ratePerSecond",
                    "0.01",
                ),
                ("monitoring.prometheusRule.callbacksOverdue.count", "2"),
                ("monitoring.prometheusRule.callbacksOverdue.for", "1m"),
                (
                    "monitoring.prometheusRule.callbacksNotPlaced.reasons",
                    "too_late",
                ),
                ("monitoring.prometheusRule.callbacksNotPlaced.count", "3"),
                ("monitoring.prometheusRule.alertLabels.team", "voice"),
            ],
        )
        .unwrap();
    let rule = all_of(&objs, "PrometheusRule").next().unwrap();
    let rules: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let by_name = |n: &str| *rules.iter().find(|r| r["alert"] == n).unwrap();
    let expr = |n: &str| by_name(n)["expr"].as_str().unwrap().to_string();
    assert!(expr("CallmebackTurnLatencyHigh").ends_with("> 0.8"));
    assert_eq!(by_name("CallmebackTurnLatencyHigh")["for"], "3m");
    assert!(expr("CallmebackSocketErrors").ends_with("> 0.5"));
    assert!(expr("CallmebackCallsFailing").ends_with("> 0.2"));
    assert!(expr("CallmebackPodsSaturated").ends_with("> 0.5"));
    assert!(expr("CallmebackReconcileErrors").ends_with("> 0.01"));
    assert!(expr("CallmebackCallbacksOverdue").ends_with("> 2"));
    assert_eq!(by_name("CallmebackCallbacksOverdue")["for"], "1m");
    assert!(expr("CallmebackCallbacksNotPlaced").contains("reason=~\"too_late\""));
    assert!(expr("CallmebackCallbacksNotPlaced").ends_with("> 3"));
    assert_eq!(rules.len(), 7);
    for r in &rules {
        assert_eq!(r["labels"]["team"], "voice", "{}", r["alert"]);
        assert!(
            r["annotations"]["summary"].as_str().unwrap().contains("{{"),
            "Prometheus templating survives Helm"
        );
    }
}

#[test]
fn notes_tell_what_to_apply_next_and_where_the_webhook_url_is() {
    // Proves NOTES.txt (rendered by a client-side dry-run install) points at the
    // examples, the webhook URL and the uninstall order.
    let out = helm()
        .run([
            "install",
            "cmb",
            chart_dir().to_str().unwrap(),
            "--namespace",
            "voice",
            "--dry-run=client",
            "--set",
            "monitoring.dashboard.enabled=true",
        ])
        .unwrap();
    let notes = out.split("NOTES:").nth(1).expect("install prints NOTES");
    for needle in [
        "examples/persona.yaml",
        "examples/voicedeployment.yaml",
        "examples/secret.yaml",
        "kubectl get personas,vd -o wide",
        "{.status.webhookUrl}",
        "kubectl delete vd",
        "cmb-callmeback-dashboard",
    ] {
        assert!(notes.contains(needle), "NOTES lack {needle:?}:\n{notes}");
    }
}
