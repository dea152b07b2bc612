//! PNG plots: latency against percentile (HdrHistogram style, on a log "nines" axis), one line per
//! operation type and run; and latency over time (p50, p99, p99.9 and max of each second).

use super::PhaseReport;
use anyhow::{bail, Context};
use plotters::prelude::*;
use std::path::Path;

/// Fonts tried for labels (Debian: fonts-dejavu-core).
const FONTS: &[&str] =
    &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"];

fn register_font() -> anyhow::Result<()> {
    for f in FONTS {
        if let Ok(bytes) = std::fs::read(f) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| anyhow::anyhow!("font {f} is not a usable TrueType font"));
        }
    }
    bail!("no font for plot labels: install fonts-dejavu-core (looked in {FONTS:?})")
}

/// Draws every (label, report) run's operations into one PNG.
pub fn write_percentile_plot(path: &Path, runs: &[(String, &PhaseReport)]) -> anyhow::Result<()> {
    register_font()?;
    let mut series = Vec::new();
    let mut max_ms: f64 = 0.1;
    for (label, report) in runs {
        for (op, s) in &report.ops {
            if s.histogram.is_empty() {
                continue;
            }
            let points: Vec<(f64, f64)> = (0..=80)
                .map(|i| {
                    // x = -log10(1 - q): 0 = p0, 1 = p90, 2 = p99, 3 = p99.9, 4 = p99.99.
                    let x = i as f64 * 0.05;
                    let q = 1.0 - 10f64.powf(-x);
                    (x, s.histogram.value_at_quantile(q) as f64 / 1000.0)
                })
                .collect();
            max_ms = points.iter().map(|p| p.1).fold(max_ms, f64::max);
            series.push((format!("{label} {}", op.name()), points));
        }
    }
    if series.is_empty() {
        bail!("nothing to plot: no successful operations");
    }
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("latency by percentile", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..4f64, 0f64..max_ms * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(5)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "p0".into(),
            1 => "p90".into(),
            2 => "p99".into(),
            3 => "p99.9".into(),
            _ => "p99.99".into(),
        })
        .draw()?;
    for (i, (name, points)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).position(SeriesLabelPosition::UpperLeft).draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Draws the run's timeline: p50, p99, p99.9 and max latency of each second, on a log axis.
pub fn write_timeline_plot(path: &Path, report: &PhaseReport) -> anyhow::Result<()> {
    register_font()?;
    if report.timeline.iter().all(|w| w.histogram.is_empty()) {
        bail!("nothing to plot: no successful operations in the timeline");
    }
    let ms = |v: u64| (v as f64 / 1000.0).max(0.01);
    // (label, quantile); None = the maximum.
    let lines = [("p50", Some(0.5)), ("p99", Some(0.99)), ("p99.9", Some(0.999)), ("max", None)];
    let seconds = report.timeline.len() as f64;
    let top = report.timeline.iter().map(|w| ms(w.histogram.max())).fold(1.0, f64::max) * 1.5;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("latency over time (each second's operations, by when they were due)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, (0.01f64..top).log_scale())?;
    chart.configure_mesh().x_desc("second of the run").y_desc("latency (ms)").draw()?;
    for (i, (name, quantile)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let value = |h: &hdrhistogram::Histogram<u64>| ms(quantile.map_or(h.max(), |q| h.value_at_quantile(q)));
        let points: Vec<(f64, f64)> =
            report.timeline.iter().enumerate().filter(|(_, w)| !w.histogram.is_empty()).map(|(s, w)| (s as f64 + 0.5, value(&w.histogram))).collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).position(SeriesLabelPosition::UpperRight).draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
