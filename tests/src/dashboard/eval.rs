//! A PromQL evaluator for the subset the dashboard and the alerts use, over a
//! [`Store`] of scrapes, following Prometheus' semantics where they shape a picture:
//! instant selectors look back 5 minutes, `rate`/`increase` extrapolate to the
//! window edges and handle counter resets, `histogram_quantile` interpolates
//! linearly inside the bucket, arithmetic and aggregations drop `__name__`.
//!
//! Anything else (set operators, `group_left`, `topk`, subqueries) is an
//! [`EvalError::Unsupported`], so a query the renderer cannot draw is caught by
//! the tests instead of producing an empty panel.

use std::collections::BTreeMap;

use promql_parser::label::Matcher;
use promql_parser::parser::{
    AggregateExpr, BinaryExpr, Call, Expr, LabelModifier, Offset, VectorMatchCardinality,
    VectorSelector,
};

use super::exposition::{Labels, Store};

/// Prometheus' default lookback for instant vector selectors.
pub const LOOKBACK_MS: i64 = 5 * 60 * 1000;

/// Why a query cannot be evaluated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EvalError {
    /// A construct outside the supported subset.
    #[error("unsupported in the dashboard renderer: {0}")]
    Unsupported(String),
    /// A type error (a range vector where an instant vector belongs, ...).
    #[error("type error: {0}")]
    Type(String),
    /// Two series with identical labels on one side of a one-to-one match.
    #[error("many-to-many matching: {0}")]
    ManyToMany(String),
}

/// An evaluation result.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number.
    Scalar(f64),
    /// An instant vector: labels and value per series.
    Vector(Vec<(Labels, f64)>),
    /// A range vector: labels and the samples in the window.
    Matrix(Vec<(Labels, Vec<(i64, f64)>)>),
}

impl Value {
    /// The instant vector, or a type error.
    pub fn into_vector(self) -> Result<Vec<(Labels, f64)>, EvalError> {
        match self {
            Value::Vector(v) => Ok(v),
            Value::Scalar(s) => Ok(vec![(Labels::new(), s)]),
            Value::Matrix(_) => Err(EvalError::Type(
                "range vector where an instant vector is needed".into(),
            )),
        }
    }
}

/// Evaluates `expr` at `t_ms` (Unix milliseconds).
pub fn eval(store: &Store, expr: &Expr, t_ms: i64) -> Result<Value, EvalError> {
    match expr {
        Expr::NumberLiteral(n) => Ok(Value::Scalar(n.val)),
        Expr::Paren(p) => eval(store, &p.expr, t_ms),
        Expr::Unary(u) => match eval(store, &u.expr, t_ms)? {
            Value::Scalar(s) => Ok(Value::Scalar(-s)),
            Value::Vector(v) => Ok(Value::Vector(
                v.into_iter().map(|(l, x)| (drop_name(l), -x)).collect(),
            )),
            Value::Matrix(_) => Err(EvalError::Type("unary minus on a range vector".into())),
        },
        Expr::VectorSelector(vs) => Ok(Value::Vector(select_instant(store, vs, t_ms)?)),
        Expr::MatrixSelector(ms) => {
            let range = ms.range.as_millis() as i64;
            Ok(Value::Matrix(select_range(store, &ms.vs, t_ms, range)?))
        }
        Expr::Call(c) => call(store, c, t_ms),
        Expr::Aggregate(a) => aggregate(store, a, t_ms),
        Expr::Binary(b) => binary(store, b, t_ms),
        Expr::StringLiteral(_) => Err(EvalError::Unsupported("string literal".into())),
        Expr::Subquery(_) => Err(EvalError::Unsupported("subquery".into())),
        Expr::Extension(_) => Err(EvalError::Unsupported("extension".into())),
    }
}

fn offset_ms(vs: &VectorSelector) -> Result<i64, EvalError> {
    if vs.at.is_some() {
        return Err(EvalError::Unsupported("@ modifier".into()));
    }
    Ok(match &vs.offset {
        None => 0,
        Some(Offset::Pos(d)) => d.as_millis() as i64,
        Some(Offset::Neg(d)) => -(d.as_millis() as i64),
    })
}

fn selects(vs: &VectorSelector, labels: &Labels) -> bool {
    let value = |name: &str| labels.get(name).map(String::as_str).unwrap_or("");
    if let Some(n) = &vs.name
        && value("__name__") != n
    {
        return false;
    }
    let all = |ms: &[Matcher]| ms.iter().all(|m| m.is_match(value(&m.name)));
    if vs.matchers.or_matchers.is_empty() {
        all(&vs.matchers.matchers)
    } else {
        all(&vs.matchers.matchers) && vs.matchers.or_matchers.iter().any(|ms| all(ms))
    }
}

fn select_instant(
    store: &Store,
    vs: &VectorSelector,
    t_ms: i64,
) -> Result<Vec<(Labels, f64)>, EvalError> {
    let at = t_ms - offset_ms(vs)?;
    Ok(store
        .series()
        .filter(|(l, _)| selects(vs, l))
        .filter_map(|(l, points)| {
            // The newest sample in (at - lookback, at].
            let idx = points.partition_point(|p| p.0 <= at);
            let p = points.get(idx.checked_sub(1)?)?;
            (p.0 > at - LOOKBACK_MS).then(|| (l.clone(), p.1))
        })
        .collect())
}

type RangeSeries = Vec<(Labels, Vec<(i64, f64)>)>;

fn select_range(
    store: &Store,
    vs: &VectorSelector,
    t_ms: i64,
    range_ms: i64,
) -> Result<RangeSeries, EvalError> {
    let at = t_ms - offset_ms(vs)?;
    Ok(store
        .series()
        .filter(|(l, _)| selects(vs, l))
        .filter_map(|(l, points)| {
            let window: Vec<(i64, f64)> = points
                .iter()
                .copied()
                .filter(|p| p.0 > at - range_ms && p.0 <= at)
                .collect();
            (!window.is_empty()).then(|| (l.clone(), window))
        })
        .collect())
}

fn drop_name(mut l: Labels) -> Labels {
    l.remove("__name__");
    l
}

fn call(store: &Store, c: &Call, t_ms: i64) -> Result<Value, EvalError> {
    let arg = |i: usize| -> Result<Value, EvalError> {
        let e =
            c.args.args.get(i).ok_or_else(|| {
                EvalError::Type(format!("{} needs argument {}", c.func.name, i + 1))
            })?;
        eval(store, e, t_ms)
    };
    let scalar = |i: usize| -> Result<f64, EvalError> {
        match arg(i)? {
            Value::Scalar(s) => Ok(s),
            _ => Err(EvalError::Type(format!(
                "{} argument {} must be a number",
                c.func.name,
                i + 1
            ))),
        }
    };
    match c.func.name {
        name @ ("rate" | "increase") => {
            let Some(Expr::MatrixSelector(ms)) = c.args.args.first().map(|b| b.as_ref()) else {
                return Err(EvalError::Type(format!("{name} needs a range selector")));
            };
            let range_ms = ms.range.as_millis() as i64;
            let Value::Matrix(m) = arg(0)? else {
                return Err(EvalError::Type(format!("{name} needs a range vector")));
            };
            let end = t_ms - offset_ms(&ms.vs)?;
            Ok(Value::Vector(
                m.into_iter()
                    .filter_map(|(l, pts)| {
                        extrapolated_delta(&pts, end - range_ms, end, name == "rate")
                            .map(|v| (drop_name(l), v))
                    })
                    .collect(),
            ))
        }
        "histogram_quantile" => {
            let q = scalar(0)?;
            let v = arg(1)?.into_vector()?;
            Ok(Value::Vector(histogram_quantile(q, v)))
        }
        name @ ("clamp_min" | "clamp_max") => {
            let v = arg(0)?.into_vector()?;
            let bound = scalar(1)?;
            Ok(Value::Vector(
                v.into_iter()
                    .map(|(l, x)| {
                        let y = if name == "clamp_min" {
                            x.max(bound)
                        } else {
                            x.min(bound)
                        };
                        (drop_name(l), y)
                    })
                    .collect(),
            ))
        }
        "vector" => Ok(Value::Vector(vec![(Labels::new(), scalar(0)?)])),
        other => Err(EvalError::Unsupported(format!("function {other}"))),
    }
}

/// Prometheus' `extrapolatedRate`: the increase over the window, corrected for
/// counter resets and extrapolated towards the window's edges (at most half a
/// sample interval beyond the first/last sample, never below zero for counters).
/// `rate` divides by the window length.
pub fn extrapolated_delta(
    points: &[(i64, f64)],
    start_ms: i64,
    end_ms: i64,
    per_second: bool,
) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let (first_t, first_v) = points[0];
    let (last_t, last_v) = points[points.len() - 1];
    let mut delta = last_v - first_v;
    for w in points.windows(2) {
        if w[1].1 < w[0].1 {
            // A counter reset: the process restarted and counted from zero.
            delta += w[0].1;
        }
    }
    let sampled = (last_t - first_t) as f64 / 1000.0;
    if sampled <= 0.0 {
        return None;
    }
    let avg_step = sampled / (points.len() - 1) as f64;
    let mut to_start = (first_t - start_ms) as f64 / 1000.0;
    let to_end = (end_ms - last_t) as f64 / 1000.0;
    if delta > 0.0 && first_v >= 0.0 {
        let to_zero = sampled * (first_v / delta);
        if to_zero < to_start {
            to_start = to_zero;
        }
    }
    let threshold = avg_step * 1.1;
    let mut interval = sampled;
    interval += if to_start < threshold {
        to_start
    } else {
        avg_step / 2.0
    };
    interval += if to_end < threshold {
        to_end
    } else {
        avg_step / 2.0
    };
    let mut result = delta * (interval / sampled);
    if per_second {
        result /= (end_ms - start_ms) as f64 / 1000.0;
    }
    Some(result)
}

/// `histogram_quantile` over classic buckets, grouped by every label but `le`.
pub fn histogram_quantile(q: f64, v: Vec<(Labels, f64)>) -> Vec<(Labels, f64)> {
    let mut groups: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    for (mut l, count) in v {
        let Some(le) = l.remove("le") else { continue };
        let Some(upper) = parse_le(&le) else { continue };
        groups.entry(drop_name(l)).or_default().push((upper, count));
    }
    groups
        .into_iter()
        .filter_map(|(l, buckets)| {
            let x = bucket_quantile(q, buckets);
            (!x.is_nan()).then_some((l, x))
        })
        .collect()
}

fn parse_le(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => s.parse().ok(),
    }
}

/// Prometheus' `bucketQuantile`.
pub fn bucket_quantile(q: f64, mut buckets: Vec<(f64, f64)>) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets.dedup_by(|b, a| {
        // Same upper bound from different series: add the counts.
        if a.0 == b.0 {
            a.1 += b.1;
            true
        } else {
            false
        }
    });
    if buckets.len() < 2 || buckets.last().map(|b| b.0) != Some(f64::INFINITY) {
        return f64::NAN;
    }
    // Rates of cumulative buckets can be slightly non-monotonic; keep them monotonic.
    let mut max = f64::NEG_INFINITY;
    for b in &mut buckets {
        max = max.max(b.1);
        b.1 = max;
    }
    let n = buckets.len();
    let observations = buckets[n - 1].1;
    if observations <= 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let b = buckets.iter().position(|x| x.1 >= rank).unwrap_or(n - 1);
    if b == n - 1 {
        return buckets[n - 2].0;
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return buckets[0].0;
    }
    let mut start = 0.0;
    let end = buckets[b].0;
    let mut count = buckets[b].1;
    if b > 0 {
        start = buckets[b - 1].0;
        count -= buckets[b - 1].1;
        rank -= buckets[b - 1].1;
    }
    start + (end - start) * (rank / count)
}

fn group_key(l: &Labels, modifier: &Option<LabelModifier>) -> Labels {
    match modifier {
        None => Labels::new(),
        Some(LabelModifier::Include(keep)) => l
            .iter()
            .filter(|(k, _)| keep.labels.iter().any(|x| x == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Some(LabelModifier::Exclude(drop)) => l
            .iter()
            .filter(|(k, _)| k.as_str() != "__name__" && !drop.labels.iter().any(|x| x == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn aggregate(store: &Store, a: &AggregateExpr, t_ms: i64) -> Result<Value, EvalError> {
    let op = a.op.to_string();
    if a.param.is_some() {
        return Err(EvalError::Unsupported(format!(
            "aggregation {op} with a parameter"
        )));
    }
    let v = eval(store, &a.expr, t_ms)?.into_vector()?;
    let mut groups: BTreeMap<Labels, Vec<f64>> = BTreeMap::new();
    for (l, x) in v {
        groups
            .entry(group_key(&l, &a.modifier))
            .or_default()
            .push(x);
    }
    let f: fn(&[f64]) -> f64 = match op.as_str() {
        "sum" => |xs| xs.iter().sum(),
        "avg" => |xs| xs.iter().sum::<f64>() / xs.len() as f64,
        "count" => |xs| xs.len() as f64,
        "min" => |xs| xs.iter().copied().fold(f64::INFINITY, f64::min),
        "max" => |xs| xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        other => return Err(EvalError::Unsupported(format!("aggregation {other}"))),
    };
    Ok(Value::Vector(
        groups.into_iter().map(|(l, xs)| (l, f(&xs))).collect(),
    ))
}

fn apply(op: &str, a: f64, b: f64) -> Result<(f64, Option<bool>), EvalError> {
    Ok(match op {
        "+" => (a + b, None),
        "-" => (a - b, None),
        "*" => (a * b, None),
        "/" => (a / b, None),
        "%" => (a % b, None),
        "^" => (a.powf(b), None),
        "==" => (a, Some(a == b)),
        "!=" => (a, Some(a != b)),
        ">" => (a, Some(a > b)),
        "<" => (a, Some(a < b)),
        ">=" => (a, Some(a >= b)),
        "<=" => (a, Some(a <= b)),
        other => return Err(EvalError::Unsupported(format!("operator {other}"))),
    })
}

fn binary(store: &Store, b: &BinaryExpr, t_ms: i64) -> Result<Value, EvalError> {
    let op = b.op.to_string();
    let return_bool = b.modifier.as_ref().is_some_and(|m| m.return_bool);
    let lhs = eval(store, &b.lhs, t_ms)?;
    let rhs = eval(store, &b.rhs, t_ms)?;
    // Comparison without `bool` filters and keeps the left value; with `bool` yields 0/1.
    let finish = |l: Labels, x: f64, cmp: Option<bool>, keep_name: bool| -> Option<(Labels, f64)> {
        match cmp {
            None => Some((drop_name(l), x)),
            Some(ok) if return_bool => Some((drop_name(l), if ok { 1.0 } else { 0.0 })),
            Some(true) => Some((if keep_name { l } else { drop_name(l) }, x)),
            Some(false) => None,
        }
    };
    match (lhs, rhs) {
        (Value::Scalar(x), Value::Scalar(y)) => {
            let (v, cmp) = apply(&op, x, y)?;
            Ok(Value::Scalar(match cmp {
                None => v,
                Some(ok) => f64::from(u8::from(ok)),
            }))
        }
        (Value::Vector(v), Value::Scalar(y)) => {
            let mut out = Vec::new();
            for (l, x) in v {
                let (r, cmp) = apply(&op, x, y)?;
                out.extend(finish(l, r, cmp, true));
            }
            Ok(Value::Vector(out))
        }
        (Value::Scalar(x), Value::Vector(v)) => {
            let mut out = Vec::new();
            for (l, y) in v {
                let (r, cmp) = apply(&op, x, y)?;
                // A filtering comparison keeps the vector's own value.
                let r = if cmp.is_some() { y } else { r };
                out.extend(finish(l, r, cmp, true));
            }
            Ok(Value::Vector(out))
        }
        (Value::Vector(lv), Value::Vector(rv)) => {
            let modifier = b.modifier.as_ref();
            if let Some(m) = modifier
                && !matches!(m.card, VectorMatchCardinality::OneToOne)
            {
                return Err(EvalError::Unsupported(format!(
                    "{:?} vector matching",
                    m.card
                )));
            }
            let matching = modifier.and_then(|m| m.matching.clone());
            let key = |l: &Labels| -> Labels {
                let base = drop_name(l.clone());
                match &matching {
                    None => base,
                    Some(m) => group_key(&base, &Some(m.clone())),
                }
            };
            let mut right: BTreeMap<Labels, f64> = BTreeMap::new();
            for (l, y) in rv {
                if right.insert(key(&l), y).is_some() {
                    return Err(EvalError::ManyToMany(format!(
                        "right side of {op} has duplicate series"
                    )));
                }
            }
            let mut out = Vec::new();
            for (l, x) in lv {
                if let Some(&y) = right.get(&key(&l)) {
                    let (r, cmp) = apply(&op, x, y)?;
                    out.extend(finish(l, r, cmp, true));
                }
            }
            Ok(Value::Vector(out))
        }
        _ => Err(EvalError::Type(format!("operator {op} on a range vector"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::parse_query;

    fn store(scrapes: &[(i64, &str)]) -> Store {
        let mut s = Store::new();
        for (t, text) in scrapes {
            s.add_scrape(*t, text, &Labels::new()).unwrap();
        }
        s
    }

    #[test]
    fn rate_over_a_steady_counter_is_its_slope() {
        // Proves rate() of a counter growing 2/s, sampled every 10 s across the
        // whole window, is 2/s (extrapolation adds nothing when samples reach the edges).
        let s = store(&[
            (0, "c_total 0"),
            (10_000, "c_total 20"),
            (20_000, "c_total 40"),
            (30_000, "c_total 60"),
        ]);
        let v = eval(&s, &parse_query("rate(c_total[30s])").unwrap(), 30_000)
            .unwrap()
            .into_vector()
            .unwrap();
        assert_eq!(v.len(), 1);
        assert!((v[0].1 - 2.0).abs() < 1e-9, "{v:?}");
        assert!(!v[0].0.contains_key("__name__"));
    }

    #[test]
    fn increase_survives_a_counter_reset() {
        // Proves a restart (counter back to 0) is counted as growth, not as a drop.
        let pts = [(0, 10.0), (10_000, 15.0), (20_000, 3.0), (30_000, 8.0)];
        let d = extrapolated_delta(&pts, 0, 30_000, false).unwrap();
        // 10 -> 15 (+5), restart, 0 -> 3 (+3), 3 -> 8 (+5): 13, samples spanning the window.
        assert!((d - 13.0).abs() < 1e-9, "{d}");
    }

    #[test]
    fn histogram_quantile_interpolates_inside_the_bucket() {
        // Proves Prometheus' interpolation: 100 observations, 50 in (0, 0.1] and 50
        // in (0.1, 0.5]: the median is 0.1 and the p75 is half way into (0.1, 0.5].
        let b = vec![(0.1, 50.0), (0.5, 100.0), (f64::INFINITY, 100.0)];
        assert!((bucket_quantile(0.5, b.clone()) - 0.1).abs() < 1e-12);
        assert!((bucket_quantile(0.75, b.clone()) - 0.3).abs() < 1e-12);
        // A rank in the +Inf bucket answers the highest finite bound.
        let tail = vec![(0.1, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(bucket_quantile(0.99, tail), 0.1);
    }

    #[test]
    fn sum_by_and_division_match_series_on_their_labels() {
        // Proves aggregation grouping and one-to-one vector matching.
        let s = store(&[(
            1_000,
            "x{p=\"a\",pod=\"1\"} 1\nx{p=\"a\",pod=\"2\"} 3\nx{p=\"b\",pod=\"1\"} 5\ny{p=\"a\"} 2\ny{p=\"b\"} 10\n",
        )]);
        let v = eval(
            &s,
            &parse_query("sum by (p) (x) / sum by (p) (y)").unwrap(),
            1_000,
        )
        .unwrap()
        .into_vector()
        .unwrap();
        let got: Vec<(String, f64)> = v.into_iter().map(|(l, x)| (l["p"].clone(), x)).collect();
        assert_eq!(got, [("a".to_string(), 2.0), ("b".to_string(), 0.5)]);
    }

    #[test]
    fn comparison_filters_and_unsupported_constructs_are_named() {
        // Proves alert-style comparisons filter, and that the renderer refuses what it
        // cannot evaluate rather than drawing nothing.
        let s = store(&[(1_000, "g{a=\"x\"} 3\ng{a=\"y\"} 1\n")]);
        let v = eval(&s, &parse_query("g > 2").unwrap(), 1_000)
            .unwrap()
            .into_vector()
            .unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0["a"], "x");
        let e = eval(&s, &parse_query("topk(1, g)").unwrap(), 1_000).unwrap_err();
        assert!(matches!(e, EvalError::Unsupported(_)));
    }

    #[test]
    fn instant_selectors_look_back_five_minutes() {
        // Proves a series vanishes from instant queries once its last sample is stale.
        let s = store(&[(0, "g 1")]);
        let q = parse_query("g").unwrap();
        assert_eq!(
            eval(&s, &q, LOOKBACK_MS - 1)
                .unwrap()
                .into_vector()
                .unwrap()
                .len(),
            1
        );
        assert!(
            eval(&s, &q, LOOKBACK_MS)
                .unwrap()
                .into_vector()
                .unwrap()
                .is_empty()
        );
    }
}
