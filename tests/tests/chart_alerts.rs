//! The chart's PrometheusRule checked by Prometheus itself: the groups Helm renders
//! pass `promtool check rules`, and the unit tests in `tests/prometheus/rules/` pass
//! `promtool test rules` against them (each alert fires with its labels and
//! rendered annotations once its `for:` has elapsed, and stays silent on healthy
//! series). promtool is built by `scripts/prometheus-build.sh`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use callmeback_tests::helm::{Helm, all_of, repo_root};
use callmeback_tests::prometheus_tools::Promtool;
use serde_json::Value;

/// The rule file name the unit tests' `rule_files` refer to.
const RULES_FILE: &str = "callmeback.rules.yaml";

/// `tests/prometheus/rules/`: the rule unit tests.
fn rule_tests_dir() -> PathBuf {
    repo_root().join("tests").join("prometheus").join("rules")
}

/// The `spec` (`{groups: [...]}`, a Prometheus rule file) of the PrometheusRule the
/// chart renders with `sets` on top of the alerts switched on.
fn rendered_rules(sets: &[(&str, &str)]) -> Value {
    let mut all = vec![("monitoring.prometheusRule.enabled", "true")];
    all.extend_from_slice(sets);
    let objs = Helm::new().unwrap().template("cmb", "voice", &all).unwrap();
    let rules: Vec<&Value> = all_of(&objs, "PrometheusRule").collect();
    assert_eq!(rules.len(), 1, "one PrometheusRule rendered");
    rules[0]["spec"].clone()
}

/// The settings the unit tests expect: default thresholds, plus an extra alert label
/// so the `alertLabels` path is rendered and checked too.
const TEST_SETS: &[(&str, &str)] = &[("monitoring.prometheusRule.alertLabels.team", "calls")];

/// Writes the rule file (JSON is YAML) into a fresh temp dir beside copies of every
/// unit test file; returns the dir and the test files' paths in it.
fn rules_workspace(spec: &Value) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(RULES_FILE),
        serde_json::to_string_pretty(spec).unwrap(),
    )
    .unwrap();
    let mut tests = Vec::new();
    for entry in std::fs::read_dir(rule_tests_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".test.yaml") {
            let copy = dir.path().join(path.file_name().unwrap());
            std::fs::copy(&path, &copy).unwrap();
            tests.push(copy);
        }
    }
    tests.sort();
    assert!(
        !tests.is_empty(),
        "no *.test.yaml in {}",
        rule_tests_dir().display()
    );
    (dir, tests)
}

fn alert_names(spec: &Value) -> BTreeSet<String> {
    spec["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn rendered_rule_groups_pass_promtool_check_rules() {
    // Proves Prometheus accepts the chart's rule groups as rendered (PromQL, `for`
    // durations, label and annotation templates, no duplicate rules) with default
    // values and with extra alert labels.
    let promtool = Promtool::get().unwrap();
    for sets in [&[][..], TEST_SETS] {
        let spec = rendered_rules(sets);
        let (dir, _) = rules_workspace(&spec);
        let rules = dir.path().join(RULES_FILE);
        let run = promtool.check_rules(&[&rules]).unwrap();
        assert!(
            run.success,
            "promtool check rules {} (sets {sets:?}):\n{}",
            rules.display(),
            run.output
        );
        assert!(
            run.output.contains("SUCCESS: 7 rules found"),
            "{}",
            run.output
        );
    }
}

#[test]
fn every_alert_fires_after_its_for_with_its_labels_and_annotations_and_not_on_healthy_series() {
    // Proves, with Prometheus' own rule engine, each alert's behaviour over time:
    // silent while pending, firing with the expected labels and annotation text
    // once `for:` has elapsed, silent on healthy series (tests/prometheus/rules/).
    let spec = rendered_rules(TEST_SETS);
    let (_dir, tests) = rules_workspace(&spec);
    let files: Vec<&Path> = tests.iter().map(PathBuf::as_path).collect();
    let run = Promtool::get().unwrap().test_rules(&files).unwrap();
    assert!(run.success, "promtool test rules:\n{}", run.output);
}

#[test]
fn every_alert_in_the_chart_has_a_firing_and_a_silent_unit_test() {
    // Proves the unit tests cover the whole PrometheusRule: every alert the chart
    // renders is expected to fire in some test case and to stay silent in another,
    // and no test names an alert the chart does not have.
    let alerts = alert_names(&rendered_rules(&[]));
    assert_eq!(alerts.len(), 7, "{alerts:?}");
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for entry in std::fs::read_dir(rule_tests_dir()).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".test.yaml") {
            continue;
        }
        let doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(doc["rule_files"][0], RULES_FILE, "{}", path.display());
        for group in doc["tests"].as_array().unwrap() {
            for case in group["alert_rule_test"].as_array().into_iter().flatten() {
                let name = case["alertname"].as_str().unwrap().to_string();
                let expected = case["exp_alerts"].as_array().map_or(0, Vec::len);
                if expected == 0 {
                    silent.insert(name);
                } else {
                    fires.insert(name);
                }
            }
        }
    }
    assert_eq!(fires, alerts, "alerts with a firing test case");
    assert_eq!(silent, alerts, "alerts with a silent test case");
}
