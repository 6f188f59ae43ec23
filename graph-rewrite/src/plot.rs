//! PNG line plots of the suite's results (match % against position).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // plotters draws text with ab_glyph from a font registered at run time; DejaVu Sans
    // comes embedded so the plots render the same on every machine.
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// One line per series: `(label, y values)` at x = `x0 + i * dx`.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<f64>)],
    x0: f64,
    dx: f64,
) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let n = series.iter().map(|(_, v)| v.len()).max().unwrap_or(1).max(1);
    let ymin = series.iter().flat_map(|(_, v)| v.iter().copied()).fold(100.0f64, f64::min).min(90.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x0 + dx * n as f64, (ymin - 1.0).max(0.0)..100.5)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (label, ys)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                ys.iter().enumerate().map(|(j, y)| (x0 + dx * j as f64, *y)),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
