//! The Prometheus text exposition format (what `/metrics` serves), read the way a
//! benchmark reads one scrape of its pod: [`parse`] into samples, and
//! [`histogram_quantile`] over a histogram's cumulative buckets with Prometheus'
//! own interpolation. (The dashboard and the alerts are evaluated by a real
//! Prometheus: see `prometheus_tools`.)

use std::collections::BTreeMap;

/// A series' labels, `__name__` included (sorted, so it can key a map).
pub type Labels = BTreeMap<String, String>;

/// A malformed exposition line.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}: {text:?}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: &'static str,
    /// The line.
    pub text: String,
}

/// One sample line: labels (with `__name__`) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Labels including `__name__`.
    pub labels: Labels,
    /// The value.
    pub value: f64,
}

/// Parses the text format (comments and `# TYPE`/`# HELP` skipped; timestamps ignored).
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason| ParseError {
            line: i + 1,
            reason,
            text: raw.to_string(),
        };
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() {
            return Err(err("empty metric name"));
        }
        let mut labels = Labels::new();
        labels.insert("__name__".into(), name.into());
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let (parsed, after) = parse_labels(body).map_err(err)?;
            labels.extend(parsed);
            rest = after;
        }
        let value_text = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?;
        let value = parse_value(value_text).ok_or_else(|| err("bad value"))?;
        out.push(Sample { labels, value });
    }
    Ok(out)
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Label pairs in exposition order.
type LabelPairs = Vec<(String, String)>;

/// Parses `k="v",k2="v2"}` (after the opening brace); returns the labels and the
/// text after the closing brace.
fn parse_labels(mut s: &str) -> Result<(LabelPairs, &str), &'static str> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok((out, after));
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim().to_string();
        let after_eq = s[eq + 1..].trim_start();
        let body = after_eq.strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = body.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated escape"),
                },
                Some((idx, '"')) => break idx,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value"),
            }
        };
        out.push((key, value));
        s = &body[end + 1..];
    }
}

/// The `q` quantile of histogram `family` in one scrape: the buckets of every
/// series whose labels include `labels` are added per bound (PromQL's
/// `histogram_quantile(q, sum by (le) (family_bucket{labels}))` over the counts
/// since the process started). NaN when no observation matches.
pub fn histogram_quantile(
    q: f64,
    samples: &[Sample],
    family: &str,
    labels: &[(&str, &str)],
) -> f64 {
    bucket_quantile(q, histogram_buckets(samples, family, labels))
}

/// The cumulative `(le, count)` buckets of histogram `family` in one scrape, of
/// every series whose labels include `labels` (unsummed: one entry per series
/// and bound).
pub fn histogram_buckets(
    samples: &[Sample],
    family: &str,
    labels: &[(&str, &str)],
) -> Vec<(f64, f64)> {
    let bucket = format!("{family}_bucket");
    samples
        .iter()
        .filter(|s| s.labels.get("__name__") == Some(&bucket))
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .filter_map(|s| Some((parse_value(s.labels.get("le")?)?, s.value)))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_lines_parse_with_escapes_and_special_values() {
        // Proves labels with escaped quotes, +Inf buckets and timestamps parse.
        let text = "# HELP x help\n# TYPE x counter\nx_total{a=\"q\\\"uote\",le=\"+Inf\"} 3 1700000000000\nup 1\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["a"], "q\"uote");
        assert_eq!(s[0].labels["le"], "+Inf");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].labels["__name__"], "up");
    }

    #[test]
    fn malformed_lines_are_rejected_with_their_number() {
        // Proves a broken scrape fails loudly instead of yielding silent gaps.
        let e = parse("ok 1\nbad{a=\"x} 2\n").unwrap_err();
        assert_eq!(e.line, 2);
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
    fn a_scrapes_histogram_quantile_sums_the_matching_series_by_bucket() {
        // Proves the buckets of every series matching the labels (two personas here)
        // are added per bound before interpolating, and other stages are left out.
        let text = "\
h_bucket{persona=\"a\",stage=\"total\",le=\"0.1\"} 50
h_bucket{persona=\"a\",stage=\"total\",le=\"0.5\"} 50
h_bucket{persona=\"a\",stage=\"total\",le=\"+Inf\"} 50
h_bucket{persona=\"b\",stage=\"total\",le=\"0.1\"} 0
h_bucket{persona=\"b\",stage=\"total\",le=\"0.5\"} 50
h_bucket{persona=\"b\",stage=\"total\",le=\"+Inf\"} 50
h_bucket{persona=\"a\",stage=\"llm\",le=\"+Inf\"} 1000
";
        let samples = parse(text).unwrap();
        let p75 = histogram_quantile(0.75, &samples, "h", &[("stage", "total")]);
        assert!((p75 - 0.3).abs() < 1e-12, "{p75}");
        assert!(histogram_quantile(0.5, &samples, "missing", &[]).is_nan());
    }
}
