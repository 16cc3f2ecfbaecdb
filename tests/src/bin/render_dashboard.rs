//! `render_dashboard`: shows what the Grafana dashboard shows, without Grafana.
//!
//! ```text
//! render_dashboard bench [--out docs/dashboard.png] [--scrape-interval 1s]
//!         [--dashboard charts/callmeback/dashboards/callmeback.json]
//!         [--font /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf]
//!         [--step 5s] [--rate-interval 1m] [--title TEXT]
//!         [--job voice-pod] [--namespace bench] [--pod voice-pod-0] -- BENCH [ARGS...]
//!     Starts a real Prometheus (scripts/prometheus-build.sh) scraping a free
//!     loopback port every scrape interval (with the job, namespace and pod labels
//!     a PodMonitor would add), runs BENCH --metrics-listen on that port with ARGS,
//!     then draws the dashboard over the run (`--rows "A,B"`: only those rows).
//!     BENCH is `call-bench` (a voice pod's
//!     metrics) or the `operator_load_poll` benchmark (the operator's).
//! render_dashboard render --prometheus URL --start UNIX_S --end UNIX_S [--out ...]
//!     Draws the dashboard from any Prometheus that holds the data.
//! ```
//!
//! Every panel query goes to Prometheus' `query_range` API, as Grafana sends it
//! (its variables substituted: `$__rate_interval` by `--rate-interval`, selection
//! variables by "All"), and the PNG draws the panels at their Grafana grid
//! positions. The numbers in the picture are what Prometheus computed from what it
//! scraped: nothing is generated here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use callmeback_tests::dashboard::{Dashboard, Panel, format_legend, substitute_variables};
use callmeback_tests::helm::repo_root;
use callmeback_tests::prometheus_tools::{PrometheusServer, QueryApi, Target};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Image width; panels are laid out on Grafana's 24-column grid.
const WIDTH: u32 = 1800;
/// Pixels per Grafana grid row.
const ROW_PX: u32 = 30;
/// Space above the grid for the dashboard title and the data source line.
const HEADER_PX: u32 = 60;
/// At most this many series per panel are drawn (the largest by last value).
const MAX_SERIES: usize = 10;
/// Points per panel when no `--step` is given (Grafana asks for about one per pixel
/// column; a quarter of that is plenty for a picture this size).
const POINTS_PER_PANEL: f64 = 240.0;

/// Grafana's classic palette.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x73, 0xbf, 0x69),
    RGBColor(0xf2, 0xcc, 0x0c),
    RGBColor(0x8a, 0xb8, 0xff),
    RGBColor(0xff, 0x78, 0x0a),
    RGBColor(0xf2, 0x49, 0x5c),
    RGBColor(0x57, 0x94, 0xf2),
    RGBColor(0xb8, 0x77, 0xd9),
    RGBColor(0x70, 0xdb, 0xed),
    RGBColor(0xfa, 0xde, 0x2a),
    RGBColor(0xc0, 0xd8, 0xff),
];
const PAGE_BG: RGBColor = RGBColor(0x11, 0x12, 0x17);
const PANEL_BG: RGBColor = RGBColor(0x18, 0x1b, 0x1f);
const TEXT: RGBColor = RGBColor(0xcc, 0xcc, 0xdc);
const DIM: RGBColor = RGBColor(0x8e, 0x8e, 0x9e);
const GRID: RGBColor = RGBColor(0x2c, 0x30, 0x35);

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]).await,
        Some("render") => render(&args[1..]).await,
        _ => bail!("usage: render_dashboard bench|render ... (see the module docs)"),
    }
}

/// `--key value` options, positional arguments, and everything after `--`.
struct Opts {
    named: BTreeMap<String, String>,
    positional: Vec<String>,
    rest: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut named = BTreeMap::new();
        let mut positional = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--" {
                break;
            }
            if let Some(key) = a.strip_prefix("--") {
                let value = it
                    .next()
                    .with_context(|| format!("--{key} needs a value"))?;
                named.insert(key.to_string(), value.clone());
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Self {
            named,
            positional,
            rest: it.cloned().collect(),
        })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.named.get(key).map(String::as_str)
    }

    fn duration(&self, key: &str, default: &str) -> anyhow::Result<Duration> {
        parse_duration(self.get(key).unwrap_or(default)).with_context(|| format!("--{key}"))
    }
}

/// `500ms`, `5s`, `2m`, `1h`.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split]
        .parse()
        .with_context(|| format!("bad duration {s:?}"))?;
    Ok(match &s[split..] {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => bail!("bad duration unit {other:?} in {s:?}"),
    })
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs the benchmark under a real Prometheus, then draws what it scraped.
async fn bench(args: &[String]) -> anyhow::Result<()> {
    let opts = Opts::parse(args)?;
    let (program, bench_args) = opts
        .rest
        .split_first()
        .context("give the benchmark after --, e.g. -- target/debug/call-bench --calls 10")?;
    let interval = opts.duration("scrape-interval", "1s")?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    // The labels a PodMonitor scrape would add, so the dashboard's selectors match.
    let target = Target {
        job: opts.get("job").unwrap_or("voice-pod").into(),
        address: listen.clone(),
        labels: vec![
            (
                "namespace".into(),
                opts.get("namespace").unwrap_or("bench").into(),
            ),
            (
                "pod".into(),
                opts.get("pod").unwrap_or("voice-pod-0").into(),
            ),
        ],
    };
    let server = PrometheusServer::start(&[target], interval).await?;
    eprintln!(
        "prometheus at {} scrapes {listen} every {interval:?}",
        server.api.url
    );
    let start = now_s();
    let status = tokio::process::Command::new(program)
        .args(bench_args)
        .args(["--metrics-listen", &listen])
        .status()
        .await
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} failed ({status})");
    }
    // The pod's last scrape happened within one interval before it exited.
    let end = now_s();
    draw_from(&opts, &server.api, start, end).await
}

/// Draws from an existing Prometheus.
async fn render(args: &[String]) -> anyhow::Result<()> {
    let opts = Opts::parse(args)?;
    if let Some(p) = opts.positional.first() {
        bail!("unexpected argument {p:?}");
    }
    let api = QueryApi::new(
        opts.get("prometheus")
            .context("--prometheus URL is required")?,
    )?;
    let time = |key: &str| -> anyhow::Result<f64> {
        opts.get(key)
            .with_context(|| format!("--{key} UNIX_SECONDS is required"))?
            .parse()
            .with_context(|| format!("--{key}"))
    };
    draw_from(&opts, &api, time("start")?, time("end")?).await
}

/// One drawn line: legend and points (seconds since the start, value).
struct Line {
    legend: String,
    points: Vec<(f64, f64)>,
}

/// How a Grafana unit is shown: a factor and a suffix.
fn unit_display(unit: &str) -> (f64, &'static str) {
    match unit {
        "s" => (1000.0, " ms"),
        "percentunit" => (100.0, "%"),
        "reqps" => (1.0, "/s"),
        _ => (1.0, ""),
    }
}

/// A panel's series over `[start, end]`, one range query per target, largest last
/// values first.
async fn evaluate(
    panel: &Panel,
    api: &QueryApi,
    range: (f64, f64),
    step: Duration,
    rate_interval: &str,
) -> anyhow::Result<Vec<Line>> {
    let (start, end) = range;
    let (factor, _) = unit_display(&panel.unit);
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for target in &panel.targets {
        let q = substitute_variables(&target.expr, rate_interval);
        let series = api
            .query_range(&q, start, end, step)
            .await
            .with_context(|| format!("panel {:?}", panel.title))?;
        for s in series {
            let points = lines
                .entry(format_legend(&target.legend, &s.labels))
                .or_default();
            // Grafana leaves a gap where a value is NaN (a quantile of no observations).
            points.extend(
                s.points
                    .iter()
                    .filter(|(_, x)| x.is_finite())
                    .map(|&(t, x)| (t - start, x * factor)),
            );
        }
    }
    let mut lines: Vec<Line> = lines
        .into_iter()
        .filter(|(_, points)| !points.is_empty())
        .map(|(legend, points)| Line { legend, points })
        .collect();
    lines.sort_by(|a, b| {
        let last = |l: &Line| l.points.last().map(|p| p.1).unwrap_or(0.0);
        last(b).total_cmp(&last(a))
    });
    lines.truncate(MAX_SERIES);
    Ok(lines)
}

/// Queries every panel over `[start, end]` and writes the PNG.
async fn draw_from(opts: &Opts, api: &QueryApi, start: f64, end: f64) -> anyhow::Result<()> {
    let root_dir = repo_root();
    let out = opts
        .get("out")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir.join("docs/dashboard.png"));
    let dash_path = opts
        .get("dashboard")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir.join("charts/callmeback/dashboards/callmeback.json"));
    let font = opts
        .get("font")
        .unwrap_or("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf");
    let rate_interval = opts.get("rate-interval").unwrap_or("1m").to_string();
    if end <= start {
        bail!("empty time range {start}..{end}");
    }
    let step = match opts.get("step") {
        Some(s) => parse_duration(s)?,
        None => Duration::from_secs_f64(((end - start) / POINTS_PER_PANEL).max(1.0)),
    };

    // ab_glyph wants 'static font bytes; the process draws one picture and exits.
    let font_bytes: &'static [u8] = Box::leak(
        std::fs::read(font)
            .with_context(|| format!("font {font} (Debian: fonts-dejavu-core)"))?
            .into_boxed_slice(),
    );
    register_font("sans-serif", FontStyle::Normal, font_bytes)
        .map_err(|_| anyhow::anyhow!("{font} is not a usable TTF/OTF font"))?;

    let mut dashboard = Dashboard::load(&dash_path)?;
    if let Some(rows) = opts.get("rows") {
        let rows: Vec<&str> = rows.split(',').map(str::trim).collect();
        dashboard.panels = only_rows(&dashboard.panels, &rows);
        if dashboard.panels.is_empty() {
            bail!("--rows {rows:?}: no such rows in {}", dash_path.display());
        }
    }
    let mut panels = Vec::new();
    for panel in &dashboard.panels {
        let lines = if panel.kind == "row" {
            Vec::new()
        } else {
            evaluate(panel, api, (start, end), step, &rate_interval).await?
        };
        panels.push((panel, lines));
    }
    let title = opts.get("title").map(str::to_string).unwrap_or_else(|| {
        format!(
            "{} dashboard, {:.0} s of data from Prometheus at {}",
            dashboard.title,
            end - start,
            api.url
        )
    });
    draw(&dashboard, &panels, &title, &out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// The rows titled `rows` with their panels, stacked from the top in their order.
fn only_rows(panels: &[Panel], rows: &[&str]) -> Vec<Panel> {
    let mut sorted: Vec<&Panel> = panels.iter().collect();
    sorted.sort_by_key(|p| (p.grid.y, p.grid.x));
    let mut out = Vec::new();
    let (mut keep, mut lift, mut bottom) = (false, 0u32, 0u32);
    for p in sorted {
        if p.kind == "row" {
            keep = rows.contains(&p.title.as_str());
            lift = p.grid.y.saturating_sub(bottom);
        }
        if keep {
            let mut kept = p.clone();
            kept.grid.y = p.grid.y.saturating_sub(lift);
            bottom = bottom.max(kept.grid.y + kept.grid.h);
            out.push(kept);
        }
    }
    out
}

fn draw(
    dashboard: &Dashboard,
    panels: &[(&Panel, Vec<Line>)],
    title: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let rows = dashboard
        .panels
        .iter()
        .map(|p| p.grid.y + p.grid.h)
        .max()
        .unwrap_or(1);
    let height = HEADER_PX + rows * ROW_PX + 10;
    let root = BitMapBackend::new(out, (WIDTH, height)).into_drawing_area();
    root.fill(&PAGE_BG)?;
    root.draw_text(
        title,
        &("sans-serif", 22).into_font().color(&TEXT),
        (16, 16),
    )?;
    let col = WIDTH as f64 / 24.0;
    for (panel, lines) in panels {
        let x = (panel.grid.x as f64 * col) as i32 + 4;
        let y = (HEADER_PX + panel.grid.y * ROW_PX) as i32 + 4;
        let w = (panel.grid.w as f64 * col) as u32 - 8;
        let h = panel.grid.h * ROW_PX - 8;
        if panel.kind == "row" {
            root.draw_text(
                &panel.title,
                &("sans-serif", 18).into_font().color(&TEXT),
                (x + 4, y + 4),
            )?;
            continue;
        }
        let area = root.clone().shrink((x, y), (w, h));
        area.fill(&PANEL_BG)?;
        area.draw_text(
            &panel.title,
            &("sans-serif", 15).into_font().color(&TEXT),
            (10, 8),
        )?;
        if lines.is_empty() {
            area.draw_text(
                "no data",
                &("sans-serif", 14).into_font().color(&DIM),
                (w as i32 / 2 - 25, h as i32 / 2),
            )?;
            continue;
        }
        if panel.kind == "stat" {
            draw_stat(&area, panel, lines, w, h)?;
        } else {
            draw_timeseries(&area, panel, lines)?;
        }
    }
    root.present()?;
    Ok(())
}

fn draw_stat<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    lines: &[Line],
    w: u32,
    h: u32,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (_, suffix) = unit_display(&panel.unit);
    let last = lines[0].points.last().map(|p| p.1).unwrap_or(0.0);
    let text = format!("{}{suffix}", fmt_value(last));
    area.draw_text(
        &text,
        &("sans-serif", 56).into_font().color(&PALETTE[0]),
        (w as i32 / 2 - 14 * text.len() as i32, h as i32 / 2 - 30),
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.1e}")
    }
}

fn draw_timeseries<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    lines: &[Line],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
    let (_, suffix) = unit_display(&panel.unit);
    let x_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let y_top = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .margin_top(32)
        .margin_left(8)
        .margin_right(16)
        .margin_bottom(6)
        .x_label_area_size(22)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_top)
        .map_err(err)?;
    let label_font = ("sans-serif", 12).into_font().color(&DIM);
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .light_line_style(PANEL_BG)
        .axis_style(GRID)
        .label_style(label_font.clone())
        .x_labels(6)
        .y_labels(5)
        .x_label_formatter(&|s| format!("{}:{:02}", (*s as i64) / 60, (*s as i64) % 60))
        .y_label_formatter(&|v| format!("{}{suffix}", fmt_value(*v)))
        .draw()
        .map_err(err)?;
    for (i, line) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(line.legend.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(PANEL_BG.mix(0.85))
        .border_style(GRID)
        .label_font(("sans-serif", 12).into_font().color(&TEXT))
        .draw()
        .map_err(err)?;
    Ok(())
}
