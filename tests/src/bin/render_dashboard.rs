//! `render_dashboard`: shows what the Grafana dashboard shows, without Grafana.
//!
//! ```text
//! render_dashboard scrape --out DIR [--interval 1s] [--duration 10m] NAME=URL...
//!     Scrapes each /metrics URL every interval into DIR/NAME/<unix_ms>.prom until
//!     the duration ends (or Ctrl-C). Run it beside a benchmark or a test run.
//! render_dashboard render --scrapes DIR [--out docs/dashboard.png]
//!         [--dashboard charts/callmeback/dashboards/callmeback.json]
//!         [--font /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf]
//!         [--step 5s] [--rate-interval 1m] [--title TEXT]
//!     Evaluates every panel's PromQL over the scrapes (callmeback_tests::dashboard)
//!     and draws the panels at their Grafana grid positions into a PNG.
//! ```
//!
//! The numbers in the picture are exactly what the scrapes contain: nothing is
//! generated here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use callmeback_tests::dashboard::eval::eval;
use callmeback_tests::dashboard::exposition::Store;
use callmeback_tests::dashboard::{
    Dashboard, Panel, format_legend, parse_query, substitute_variables,
};
use callmeback_tests::helm::repo_root;
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
/// Scrape request timeout.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

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

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("scrape") => scrape(&args[1..]),
        Some("render") => render(&args[1..]),
        _ => bail!("usage: render_dashboard scrape|render ... (see the module docs)"),
    }
}

/// `--key value` options and positional arguments.
struct Opts {
    named: BTreeMap<String, String>,
    positional: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut named = BTreeMap::new();
        let mut positional = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(key) = a.strip_prefix("--") {
                let value = it
                    .next()
                    .with_context(|| format!("--{key} needs a value"))?;
                named.insert(key.to_string(), value.clone());
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Self { named, positional })
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn scrape(args: &[String]) -> anyhow::Result<()> {
    let opts = Opts::parse(args)?;
    let out = PathBuf::from(opts.get("out").context("--out DIR is required")?);
    let interval = opts.duration("interval", "1s")?;
    let duration = opts.duration("duration", "10m")?;
    let targets: Vec<(String, String)> = opts
        .positional
        .iter()
        .map(|t| {
            t.split_once('=')
                .map(|(n, u)| (n.to_string(), u.to_string()))
                .with_context(|| format!("target {t:?} is not NAME=URL"))
        })
        .collect::<anyhow::Result<_>>()?;
    if targets.is_empty() {
        bail!("no targets: give NAME=URL, e.g. voice-0=http://127.0.0.1:9090/metrics");
    }
    for (name, _) in &targets {
        std::fs::create_dir_all(out.join(name))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = reqwest::Client::builder().timeout(SCRAPE_TIMEOUT).build()?;
        let deadline = tokio::time::Instant::now() + duration;
        let mut tick = tokio::time::interval(interval);
        let mut taken = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::signal::ctrl_c() => break,
            }
            for (name, url) in &targets {
                let t = now_ms();
                // A target that is down for a moment is a gap in the graph, not a reason to stop.
                match client
                    .get(url)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                {
                    Ok(resp) => match resp.text().await {
                        Ok(body) => {
                            tokio::fs::write(out.join(name).join(format!("{t}.prom")), body)
                                .await?;
                            taken += 1;
                        }
                        Err(e) => eprintln!("{name}: reading body: {e}"),
                    },
                    Err(e) => eprintln!("{name}: {e}"),
                }
            }
        }
        eprintln!("{taken} scrapes written to {}", out.display());
        anyhow::Ok(())
    })
}

/// One drawn line: legend and points (seconds since the first scrape, value).
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

fn evaluate(
    panel: &Panel,
    store: &Store,
    times: &[i64],
    rate_interval: &str,
) -> anyhow::Result<Vec<Line>> {
    let t0 = times.first().copied().unwrap_or(0);
    let (factor, _) = unit_display(&panel.unit);
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for target in &panel.targets {
        let q = substitute_variables(&target.expr, rate_interval);
        let expr = parse_query(&q)?;
        for &t in times {
            let v = eval(store, &expr, t)
                .with_context(|| format!("panel {:?}: {}", panel.title, target.expr))?
                .into_vector()?;
            for (labels, x) in v {
                if x.is_finite() {
                    lines
                        .entry(format_legend(&target.legend, &labels))
                        .or_default()
                        .push(((t - t0) as f64 / 1000.0, x * factor));
                }
            }
        }
    }
    let mut lines: Vec<Line> = lines
        .into_iter()
        .map(|(legend, points)| Line { legend, points })
        .collect();
    lines.sort_by(|a, b| {
        let last = |l: &Line| l.points.last().map(|p| p.1).unwrap_or(0.0);
        last(b).total_cmp(&last(a))
    });
    lines.truncate(MAX_SERIES);
    Ok(lines)
}

fn render(args: &[String]) -> anyhow::Result<()> {
    let opts = Opts::parse(args)?;
    let root_dir = repo_root();
    let scrapes = PathBuf::from(opts.get("scrapes").context("--scrapes DIR is required")?);
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

    // ab_glyph wants 'static font bytes; the process draws one picture and exits.
    let font_bytes: &'static [u8] = Box::leak(
        std::fs::read(font)
            .with_context(|| format!("font {font} (Debian: fonts-dejavu-core)"))?
            .into_boxed_slice(),
    );
    register_font("sans-serif", FontStyle::Normal, font_bytes)
        .map_err(|_| anyhow::anyhow!("{font} is not a usable TTF/OTF font"))?;

    let dashboard = Dashboard::load(&dash_path)?;
    let mut store = Store::new();
    let n = store.load_dir(&scrapes)?;
    let (first, last) = store
        .time_range()
        .with_context(|| format!("no scrapes in {}", scrapes.display()))?;
    let span = (last - first).max(1);
    let step = match opts.get("step") {
        Some(s) => parse_duration(s)?.as_millis() as i64,
        None => (span / 240).max(1000),
    };
    let times: Vec<i64> = (0..=span / step).map(|i| first + i * step).collect();
    let title = opts.get("title").map(str::to_string).unwrap_or_else(|| {
        format!(
            "{} dashboard, rendered from {n} scrapes over {:.0} s ({})",
            dashboard.title,
            span as f64 / 1000.0,
            scrapes
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    });
    draw(&dashboard, &store, &times, &rate_interval, &title, &out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn draw(
    dashboard: &Dashboard,
    store: &Store,
    times: &[i64],
    rate_interval: &str,
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
    for panel in &dashboard.panels {
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
        let lines = evaluate(panel, store, times, rate_interval)?;
        if lines.iter().all(|l| l.points.is_empty()) {
            area.draw_text(
                "no data in these scrapes",
                &("sans-serif", 14).into_font().color(&DIM),
                (w as i32 / 2 - 80, h as i32 / 2),
            )?;
            continue;
        }
        if panel.kind == "stat" {
            draw_stat(&area, panel, &lines, w, h)?;
        } else {
            draw_timeseries(&area, panel, &lines)?;
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
