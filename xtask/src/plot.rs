//! Line charts for `repro` reports, drawn with `plotters` into PNG files.
//! Every chart's data is also written beside it as JSON (`<name>.json`:
//! title, axis labels and each series' points), so tests and readers can
//! check what was plotted against the logged metrics.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// One named line: points `(x, y)` in drawing order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart's content, as written to `<name>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic y axis (losses).
    pub log_y: bool,
    pub series: Vec<Series>,
}

#[cfg(xtask_font)]
static FONT: &[u8] = include_bytes!(env!("XTASK_FONT"));

fn register_font() -> Result<()> {
    #[cfg(xtask_font)]
    {
        static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *ONCE.get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
        }) {
            return Ok(());
        }
        bail!("the embedded DejaVu Sans font did not load");
    }
    #[cfg(not(xtask_font))]
    bail!("xtask was built without a font: run `cargo xtask setup` (installs fonts-dejavu-core), then rebuild")
}

/// `[lo, hi]` of the values, widened a little (and made non-empty).
fn range(vals: impl Iterator<Item = f64>, log: bool) -> Option<(f64, f64)> {
    let (lo, hi) = vals
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if lo > hi {
        return None;
    }
    Some(if log {
        (lo / 1.15, hi * 1.15)
    } else if hi > lo {
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
        (lo - pad, hi + pad)
    })
}

/// Draws `chart` into `dir/<name>.png` and writes `dir/<name>.json`.
pub fn draw(dir: &Path, name: &str, chart: &Chart) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join(format!("{name}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(chart)?)
        .with_context(|| format!("writing {}", json.display()))?;
    register_font()?;
    let png = dir.join(format!("{name}.png"));
    let all = || chart.series.iter().flat_map(|s| s.points.iter());
    let (Some(xr), Some(yr)) = (
        range(all().map(|p| p.0), false),
        range(all().map(|p| p.1), chart.log_y),
    ) else {
        bail!("chart `{}` has no finite points", chart.title);
    };
    let err = |e: &dyn std::fmt::Debug| anyhow!("drawing {}: {e:?}", png.display());
    let root = BitMapBackend::new(&png, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&chart.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80);
    // Log and linear axes have different coordinate types: one generic body.
    macro_rules! body {
        ($ctx:expr) => {{
            let mut ctx = $ctx.map_err(|e| err(&e))?;
            ctx.configure_mesh()
                .x_desc(chart.x_label.as_str())
                .y_desc(chart.y_label.as_str())
                .x_label_formatter(&|v| tick(*v))
                .y_label_formatter(&|v| tick(*v))
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(|e| err(&e))?;
            for (i, s) in chart.series.iter().enumerate() {
                let color = Palette99::pick(i).mix(1.0);
                ctx.draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                });
                ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| err(&e))?;
            }
            ctx.configure_series_labels()
                .label_font(("sans-serif", 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    if chart.log_y {
        body!(builder.build_cartesian_2d(xr.0..xr.1, (yr.0..yr.1).log_scale()));
    } else {
        body!(builder.build_cartesian_2d(xr.0..xr.1, yr.0..yr.1));
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// An axis label: at most 4 significant digits, no float noise such as
/// `0.30000000000000004`.
fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.digits$}");
    match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => s,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ticks_are_short() {
        assert_eq!(super::tick(0.30000000000000004), "0.3");
        assert_eq!(super::tick(1234.5678), "1235");
        assert_eq!(super::tick(0.012345), "0.01235");
        assert_eq!(super::tick(20.0), "20");
        assert_eq!(super::tick(0.0), "0");
    }

    use super::*;

    #[test]
    fn draws_png_and_json_with_the_same_points() {
        let dir = tempfile::tempdir().unwrap();
        let chart = Chart {
            title: "loss".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            log_y: true,
            series: vec![
                Series {
                    name: "a".into(),
                    points: vec![(1.0, 0.5), (2.0, 0.25), (3.0, 0.2)],
                },
                Series {
                    name: "b".into(),
                    points: vec![(1.0, 0.6)],
                },
            ],
        };
        draw(dir.path(), "loss", &chart).unwrap();
        let png = std::fs::read(dir.path().join("loss.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let back: Chart =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("loss.json")).unwrap())
                .unwrap();
        assert_eq!(back, chart);
        // A single point (one arm, one FID) still gets a non-empty range.
        let one = Chart {
            log_y: false,
            series: vec![chart.series[1].clone()],
            ..chart
        };
        draw(dir.path(), "one", &one).unwrap();
        assert!(dir.path().join("one.png").is_file());
    }
}
