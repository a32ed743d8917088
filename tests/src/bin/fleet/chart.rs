//! The timeline as an SVG chart (plotters, SVG backend only): platform
//! calls per second in [`crate::verdict::WINDOW`] bins over the run, the
//! steady state's mean and the 2× line the peak must stay under, and where
//! the first lifetime (the rollout, not judged) ends.
//!
//! People would rather look at the load than read it; the chart is written
//! next to the numbers (`fleet.json`) by the same run.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// Pixels.
const SIZE: (u32, u32) = (960, 480);

/// What is drawn.
pub(crate) struct Chart {
    pub(crate) title: String,
    /// Width of each bin, seconds.
    pub(crate) bin_secs: f64,
    /// Calls per second in each bin, from the rollout on.
    pub(crate) rates: Vec<f64>,
    /// Steady-state mean, calls per second.
    pub(crate) mean_rps: f64,
    /// The line the steady state's peak must stay under.
    pub(crate) target_rps: f64,
    /// Where the steady state starts, seconds.
    pub(crate) steady_from: f64,
    /// The run's length, seconds.
    pub(crate) elapsed: f64,
}

/// Writes `chart` to `path`.
pub(crate) fn draw(path: &Path, chart: &Chart) -> anyhow::Result<()> {
    render(path, chart)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot draw {}", path.display()))
}

fn render(path: &Path, chart: &Chart) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    // The rollout bin dwarfs the rest; a log scale would hide the steady
    // state's shape, so the y axis is cut at a few times the steady peak
    // and the rollout's height is printed instead.
    let steady_peak = chart
        .rates
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as f64 * chart.bin_secs >= chart.steady_from)
        .map(|(_, r)| *r)
        .fold(chart.target_rps, f64::max);
    let rollout_peak = chart.rates.iter().copied().fold(0.0, f64::max);
    let y_max = (steady_peak * 1.3).max(0.1);
    let mut plot = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..chart.elapsed, 0.0..y_max)?;
    plot.configure_mesh()
        .x_desc("seconds since the rollout")
        .y_desc("platform calls per second (10-s bins)")
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    // Step line: each bin's rate held over its width (cut at the top).
    let mut steps = Vec::with_capacity(chart.rates.len() * 2);
    for (i, rate) in chart.rates.iter().enumerate() {
        let from = i as f64 * chart.bin_secs;
        let to = (from + chart.bin_secs).min(chart.elapsed);
        steps.push((from, rate.min(y_max)));
        steps.push((to, rate.min(y_max)));
    }
    plot.draw_series(LineSeries::new(steps, BLUE.stroke_width(2)))?
        .label("calls per second")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    plot.draw_series(LineSeries::new(
        [
            (chart.steady_from, chart.mean_rps),
            (chart.elapsed, chart.mean_rps),
        ],
        GREEN.stroke_width(2),
    ))?
    .label(format!("steady-state mean {:.2}/s", chart.mean_rps))
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    plot.draw_series(LineSeries::new(
        [
            (chart.steady_from, chart.target_rps),
            (chart.elapsed, chart.target_rps),
        ],
        RED.stroke_width(1),
    ))?
    .label("target: peak under 2x the mean")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(1)));
    plot.draw_series(LineSeries::new(
        [(chart.steady_from, 0.0), (chart.steady_from, y_max)],
        BLACK.mix(0.4).stroke_width(1),
    ))?
    .label(format!(
        "end of the first lifetime (rollout, peak {rollout_peak:.0}/s, not judged)"
    ))
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    plot.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}
