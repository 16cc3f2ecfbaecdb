//! The Grafana dashboard (`charts/callmeback/dashboards/callmeback.json`) as data:
//! its panels and queries, the metric names those queries use, Grafana's variable
//! substitution and legend formats.
//!
//! Used by the chart tests (every query names a metric the code exports, and returns
//! data when a real Prometheus evaluates it) and by `render_dashboard`, which sends
//! every panel's query to a real Prometheus and draws the answers into
//! `docs/dashboard.png`. PromQL is evaluated by Prometheus only
//! ([`crate::prometheus_tools`]); [`parse_query`] parses it to read metric names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use promql_parser::parser::{self, Expr};
use serde_json::Value;

/// Why the dashboard could not be read or a query not understood.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The JSON is malformed or lacks a required field.
    #[error("dashboard JSON: {0}")]
    Json(String),
    /// A query is not valid PromQL (after Grafana variables are substituted).
    #[error("query {query:?} is not valid PromQL: {reason}")]
    PromQl {
        /// The query as substituted.
        query: String,
        /// The parser's message.
        reason: String,
    },
}

/// One query of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// `refId` (A, B, ...).
    pub ref_id: String,
    /// The PromQL with Grafana variables (`$namespace`, `$__rate_interval`).
    pub expr: String,
    /// Grafana legend format, e.g. `{{persona}} p95`.
    pub legend: String,
}

/// Position on Grafana's 24-column grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GridPos {
    /// Column (0..24).
    pub x: u32,
    /// Row.
    pub y: u32,
    /// Width in columns.
    pub w: u32,
    /// Height in rows.
    pub h: u32,
}

/// A panel (rows included, with no targets).
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Panel id.
    pub id: u64,
    /// `timeseries`, `stat`, `row`, ...
    pub kind: String,
    /// Title.
    pub title: String,
    /// `fieldConfig.defaults.unit` (`s`, `percentunit`, `short`, `reqps`).
    pub unit: String,
    /// Grid position.
    pub grid: GridPos,
    /// Queries.
    pub targets: Vec<Target>,
}

/// A templating variable with a query (`label_values(...)`).
#[derive(Debug, Clone, PartialEq)]
pub struct Variable {
    /// Name (`namespace`).
    pub name: String,
    /// Its query, when it is a query variable.
    pub query: Option<String>,
}

/// The parsed dashboard.
#[derive(Debug, Clone, PartialEq)]
pub struct Dashboard {
    /// Title.
    pub title: String,
    /// Panels in file order, rows' nested panels flattened after their row.
    pub panels: Vec<Panel>,
    /// Templating variables.
    pub variables: Vec<Variable>,
}

impl Dashboard {
    /// Reads and parses a dashboard file.
    pub fn load(path: &Path) -> Result<Self, DashboardError> {
        let text = std::fs::read_to_string(path).map_err(|source| DashboardError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses dashboard JSON.
    pub fn from_json(text: &str) -> Result<Self, DashboardError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| DashboardError::Json(e.to_string()))?;
        let title = v["title"]
            .as_str()
            .ok_or_else(|| DashboardError::Json("missing title".into()))?
            .to_string();
        let mut panels = Vec::new();
        for p in v["panels"]
            .as_array()
            .ok_or_else(|| DashboardError::Json("missing panels".into()))?
        {
            panels.push(panel(p)?);
            // Collapsed rows carry their panels inside.
            for nested in p["panels"].as_array().into_iter().flatten() {
                panels.push(panel(nested)?);
            }
        }
        let variables = v["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|var| Variable {
                name: var["name"].as_str().unwrap_or_default().to_string(),
                query: match &var["query"] {
                    Value::String(q) if var["type"] == "query" => Some(q.clone()),
                    Value::Object(o) if var["type"] == "query" => {
                        o.get("query").and_then(Value::as_str).map(str::to_string)
                    }
                    _ => None,
                },
            })
            .collect();
        Ok(Self {
            title,
            panels,
            variables,
        })
    }

    /// Every PromQL query in the dashboard, panel targets and variable queries, with
    /// a description of where it is. `label_values(selector, label)` yields the selector.
    pub fn queries(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for p in &self.panels {
            for t in &p.targets {
                out.push((
                    format!("panel {:?} target {}", p.title, t.ref_id),
                    t.expr.clone(),
                ));
            }
        }
        for v in &self.variables {
            if let Some(q) = &v.query {
                let selector = label_values_selector(q).unwrap_or(q);
                out.push((format!("variable {:?}", v.name), selector.to_string()));
            }
        }
        out
    }
}

fn panel(p: &Value) -> Result<Panel, DashboardError> {
    let g = &p["gridPos"];
    let num = |v: &Value| v.as_u64().unwrap_or(0) as u32;
    let targets = p["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            Ok(Target {
                ref_id: t["refId"].as_str().unwrap_or_default().to_string(),
                expr: t["expr"]
                    .as_str()
                    .ok_or_else(|| {
                        DashboardError::Json(format!("panel {} target without expr", p["id"]))
                    })?
                    .to_string(),
                legend: t["legendFormat"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect::<Result<_, DashboardError>>()?;
    Ok(Panel {
        id: p["id"].as_u64().unwrap_or(0),
        kind: p["type"].as_str().unwrap_or_default().to_string(),
        title: p["title"].as_str().unwrap_or_default().to_string(),
        unit: p["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or("short")
            .to_string(),
        grid: GridPos {
            x: num(&g["x"]),
            y: num(&g["y"]),
            w: num(&g["w"]),
            h: num(&g["h"]),
        },
        targets,
    })
}

/// The selector inside `label_values(selector, label)`, if `q` is one.
fn label_values_selector(q: &str) -> Option<&str> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    // The label is the part after the last top-level comma.
    let comma = inner.rfind(',')?;
    Some(inner[..comma].trim())
}

/// Replaces Grafana's variables with values that make a plain PromQL query:
/// interval variables with `interval` (e.g. `1m`), every other `$var` / `${var}`
/// with `.*` (the dashboard uses them only inside `=~` matchers, as "All").
pub fn substitute_variables(expr: &str, interval: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        let name = name.split(':').next().unwrap_or(name);
        if name.starts_with("__") {
            out.push_str(interval);
        } else {
            out.push_str(".*");
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Parses a dashboard or alert query (Grafana variables substituted first).
pub fn parse_query(expr: &str) -> Result<Expr, DashboardError> {
    let q = substitute_variables(expr, "1m");
    parser::parse(&q).map_err(|reason| DashboardError::PromQl { query: q, reason })
}

/// Every metric name a query selects (the names of its vector selectors, or their
/// `__name__="..."` matchers).
pub fn metric_names(expr: &Expr) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    collect_names(expr, &mut names);
    names
}

fn collect_names(expr: &Expr, names: &mut BTreeSet<String>) {
    match expr {
        Expr::Aggregate(a) => {
            collect_names(&a.expr, names);
            if let Some(p) = &a.param {
                collect_names(p, names);
            }
        }
        Expr::Unary(u) => collect_names(&u.expr, names),
        Expr::Binary(b) => {
            collect_names(&b.lhs, names);
            collect_names(&b.rhs, names);
        }
        Expr::Paren(p) => collect_names(&p.expr, names),
        Expr::Subquery(s) => collect_names(&s.expr, names),
        Expr::VectorSelector(vs) => push_selector_name(vs, names),
        Expr::MatrixSelector(ms) => push_selector_name(&ms.vs, names),
        Expr::Call(c) => {
            for a in &c.args.args {
                collect_names(a, names);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

fn push_selector_name(vs: &promql_parser::parser::VectorSelector, names: &mut BTreeSet<String>) {
    if let Some(n) = &vs.name {
        names.insert(n.clone());
    }
    for m in vs.matchers.find_matchers("__name__") {
        if matches!(m.op, promql_parser::label::MatchOp::Equal) {
            names.insert(m.value.clone());
        }
    }
}

/// The metric family of a sample name: histograms and summaries expose
/// `<family>_bucket`, `_sum` and `_count`.
pub fn family_name(sample_name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample_name.strip_suffix(suffix) {
            return base;
        }
    }
    sample_name
}

/// Grafana's legend format: `{{label}}` replaced by the label's value.
pub fn format_legend(legend: &str, labels: &BTreeMap<String, String>) -> String {
    if legend.is_empty() {
        let inner: Vec<String> = labels
            .iter()
            .filter(|(k, _)| k.as_str() != "__name__")
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        return format!("{{{}}}", inner.join(", "));
    }
    let mut out = String::new();
    let mut rest = legend;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let key = after[..end].trim();
                out.push_str(labels.get(key).map(String::as_str).unwrap_or(""));
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grafana_variables_become_plain_promql() {
        // Proves interval and selection variables are replaced, braces included.
        assert_eq!(
            substitute_variables(
                r#"rate(x{namespace=~"$namespace", p=~"${persona}"}[$__rate_interval])"#,
                "2m"
            ),
            r#"rate(x{namespace=~".*", p=~".*"}[2m])"#
        );
    }

    #[test]
    fn metric_names_come_from_selectors_not_labels_or_functions() {
        // Proves names are read from the parsed query: label names, functions and
        // aggregation labels are not mistaken for metrics.
        let e = parse_query(
            r#"sum by (le, persona) (rate(a_bucket{stage="x"}[5m])) / on(persona) clamp_min(sum by (persona) (rate({__name__="b_total"}[5m])), 1)"#,
        )
        .unwrap();
        let names: Vec<_> = metric_names(&e).into_iter().collect();
        assert_eq!(names, ["a_bucket", "b_total"]);
        assert_eq!(family_name("a_bucket"), "a");
    }

    #[test]
    fn label_values_queries_yield_their_selector() {
        // Proves variable queries are checked through their selector.
        assert_eq!(
            label_values_selector(r#"label_values(m_count{namespace=~"$namespace"}, persona)"#),
            Some(r#"m_count{namespace=~"$namespace"}"#)
        );
    }

    #[test]
    fn legends_fill_in_label_values() {
        // Proves Grafana legend formats render like Grafana does.
        let labels: BTreeMap<String, String> = [("persona".to_string(), "ada".to_string())].into();
        assert_eq!(format_legend("{{persona}} p95", &labels), "ada p95");
        assert_eq!(format_legend("{{ missing }}x", &labels), "x");
    }
}
