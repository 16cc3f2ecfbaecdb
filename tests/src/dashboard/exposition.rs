//! Prometheus text exposition format (what `/metrics` serves) into time series.
//!
//! [`Store`] holds the samples of many scrapes: one scrape is a timestamp and the
//! text of one target's `/metrics`, plus target labels (`pod`, `namespace`) the way
//! Prometheus adds them.

use std::collections::BTreeMap;
use std::path::Path;

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

/// Samples of many scrapes, by series.
#[derive(Debug, Default, Clone)]
pub struct Store {
    series: BTreeMap<Labels, Vec<(i64, f64)>>,
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one scrape of one target taken at `t_ms` (Unix milliseconds).
    /// `target` labels (e.g. `pod`) are added to every sample, as Prometheus does.
    pub fn add_scrape(&mut self, t_ms: i64, text: &str, target: &Labels) -> Result<(), ParseError> {
        for s in parse(text)? {
            let mut labels = s.labels;
            for (k, v) in target {
                labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
            let points = self.series.entry(labels).or_default();
            points.push((t_ms, s.value));
            // Scrapes may be added out of order (one directory per target).
            if points.len() > 1 && points[points.len() - 2].0 > t_ms {
                points.sort_by_key(|p| p.0);
            }
        }
        Ok(())
    }

    /// Loads a scrape directory written by `render_dashboard scrape`:
    /// `<dir>/<target>/<unix_ms>.prom`, the target directory's name becoming the
    /// `pod` label. Returns the number of scrapes loaded.
    pub fn load_dir(&mut self, dir: &Path) -> Result<usize, LoadError> {
        let mut count = 0;
        let io = |e: std::io::Error, p: &Path| LoadError::Io(p.display().to_string(), e);
        for target in std::fs::read_dir(dir).map_err(|e| io(e, dir))? {
            let target = target.map_err(|e| io(e, dir))?.path();
            if !target.is_dir() {
                continue;
            }
            let pod = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let labels: Labels = [("pod".to_string(), pod)].into();
            for file in std::fs::read_dir(&target).map_err(|e| io(e, &target))? {
                let file = file.map_err(|e| io(e, &target))?.path();
                let Some(t_ms) = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".prom"))
                    .and_then(|n| n.parse::<i64>().ok())
                else {
                    continue;
                };
                let text = std::fs::read_to_string(&file).map_err(|e| io(e, &file))?;
                self.add_scrape(t_ms, &text, &labels)
                    .map_err(|e| LoadError::Parse(file.display().to_string(), e))?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Every series.
    pub fn series(&self) -> impl Iterator<Item = (&Labels, &[(i64, f64)])> {
        self.series.iter().map(|(l, p)| (l, p.as_slice()))
    }

    /// First and last sample time, if any.
    pub fn time_range(&self) -> Option<(i64, i64)> {
        let first = self
            .series
            .values()
            .filter_map(|p| p.first())
            .map(|p| p.0)
            .min()?;
        let last = self
            .series
            .values()
            .filter_map(|p| p.last())
            .map(|p| p.0)
            .max()?;
        Some((first, last))
    }

    /// Whether any series has this metric name.
    pub fn has_metric(&self, name: &str) -> bool {
        self.series
            .keys()
            .any(|l| l.get("__name__").map(String::as_str) == Some(name))
    }
}

/// A scrape directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A file is not valid exposition text.
    #[error("{0}: {1}")]
    Parse(String, #[source] ParseError),
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
}
