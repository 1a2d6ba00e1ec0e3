//! PNG line charts for the report, drawn with plotters into memory, encoded with `png` and
//! written atomically. Text is rendered with DejaVu Sans compiled into the binary (plotters'
//! `ab_glyph` backend), so plotting needs no system fonts or fontconfig.
use anyhow::{anyhow, ensure, Context, Result};
use linearize_models::atomic;
use plotters::coord::combinators::LogCoord;
use plotters::coord::ranged1d::{
    AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged, ValueFormatter,
};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

/// Pixels of one panel.
const PANEL_WIDTH: u32 = 640;
const PANEL_HEIGHT: u32 = 420;
const FONT: &str = "sans-serif";

/// Teacher blue, student red, then further series (ten distinct colours, so a comparison of
/// up to ten runs has no repeated colour).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a chart, optionally with an interval (error bar) at each point.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// `(low, high)` of each point's y (as many as `points`), or empty: no error bars.
    pub intervals: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            intervals: Vec::new(),
        }
    }

    /// The series with a vertical error bar `(low, high)` at each point.
    pub fn with_intervals(mut self, intervals: Vec<(f64, f64)>) -> Self {
        self.intervals = intervals;
        self
    }
}

/// One chart: axes, title and lines.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_x: bool,
    pub log_y: bool,
    /// Fixed y range (e.g. 0..1 for accuracies); otherwise fitted to the data.
    pub y_range: Option<(f64, f64)>,
    /// Tick marks of the x axis (e.g. layer indices). By default a logarithmic x axis is
    /// ticked at the data's x values when there are few, a linear one automatically.
    pub x_ticks: Option<Vec<f64>>,
}

/// Draws `panels` in a grid of `columns` and writes the PNG to `path` atomically.
pub fn write_png(path: &Path, panels: &[Panel], columns: usize) -> Result<()> {
    let bytes = render_png(panels, columns)?;
    atomic::write_file(path, &bytes).with_context(|| format!("writing plot {}", path.display()))
}

/// Draws `panels` in a grid of `columns`, returning the encoded PNG.
pub fn render_png(panels: &[Panel], columns: usize) -> Result<Vec<u8>> {
    ensure!(!panels.is_empty() && columns >= 1, "nothing to plot");
    register_font()?;
    let columns = columns.min(panels.len());
    let rows = panels.len().div_ceil(columns);
    let (width, height) = (PANEL_WIDTH * columns as u32, PANEL_HEIGHT * rows as u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let areas = root.split_evenly((rows, columns));
        for (panel, area) in panels.iter().zip(&areas) {
            draw_panel(area, panel).with_context(|| format!("drawing {:?}", panel.title))?;
        }
        root.present().map_err(plot_error)?;
    }
    let mut png_bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut png_bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("encoding PNG")?;
    writer.write_image_data(&pixels).context("encoding PNG")?;
    writer.finish().context("encoding PNG")?;
    Ok(png_bytes)
}

fn plot_error(err: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotting: {err}")
}

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    ensure!(ok, "the embedded DejaVu Sans font could not be loaded");
    Ok(())
}

/// Whether the axes can show the point (positive where an axis is logarithmic, finite
/// everywhere).
fn shown(panel: &Panel, (x, y): (f64, f64)) -> bool {
    x.is_finite() && y.is_finite() && (!panel.log_x || x > 0.0) && (!panel.log_y || y > 0.0)
}

/// The points of `series` that the axes can show.
fn visible(panel: &Panel, series: &Series) -> Vec<(f64, f64)> {
    series
        .points
        .iter()
        .copied()
        .filter(|&p| shown(panel, p))
        .collect()
}

/// The error bars `(x, low, high)` of `series` at points the axes can show.
fn visible_bars(panel: &Panel, series: &Series) -> Vec<(f64, f64, f64)> {
    series
        .points
        .iter()
        .zip(&series.intervals)
        .filter(|&(&p, &(low, high))| {
            shown(panel, p) && shown(panel, (p.0, low)) && high.is_finite()
        })
        .map(|(&(x, _), &(low, high))| (x, low, high))
        .collect()
}

/// A range around `values` with a margin, positive for log axes.
fn fit(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        return (lo / 1.25, hi * 1.25);
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// The smallest max/min ratio drawn on a logarithmic y axis.
const LOG_AXIS_MIN_SPAN: f64 = 10.0;

fn draw_panel(area: &DrawingArea<BitMapBackend, Shift>, panel: &Panel) -> Result<()> {
    let points: Vec<Vec<(f64, f64)>> = panel.series.iter().map(|s| visible(panel, s)).collect();
    let (x0, x1) = fit(points.iter().flatten().map(|p| p.0), panel.log_x);
    let fit_y = |log| {
        panel
            .y_range
            .unwrap_or_else(|| fit(points.iter().flatten().map(|p| p.1), log))
    };
    let (mut y0, mut y1) = fit_y(panel.log_y);
    // A log axis spanning less than a decade gets no labelled tick; a linear one reads better.
    let log_y = panel.log_y && y1 / y0 >= LOG_AXIS_MIN_SPAN;
    if panel.log_y && !log_y {
        (y0, y1) = fit_y(false);
    }
    let ticks = panel.x_ticks.clone().or_else(|| {
        let mut xs: Vec<f64> = points.iter().flatten().map(|p| p.0).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        (panel.log_x && (1..=16).contains(&xs.len())).then_some(xs)
    });
    let linear_x = || Ticks {
        inner: RangedCoordf64::from(x0..x1),
        ticks: ticks.clone(),
    };
    let log_x = || Ticks {
        inner: LogCoord::from((x0..x1).log_scale()),
        ticks: ticks.clone(),
    };
    match (panel.log_x, log_y) {
        (false, false) => draw_axes(area, panel, &points, linear_x(), y0..y1),
        (true, false) => draw_axes(area, panel, &points, log_x(), y0..y1),
        (false, true) => draw_axes(area, panel, &points, linear_x(), (y0..y1).log_scale()),
        (true, true) => draw_axes(area, panel, &points, log_x(), (y0..y1).log_scale()),
    }
}

/// An axis ticked at given values, or where its inner axis would tick them.
struct Ticks<R> {
    inner: R,
    ticks: Option<Vec<f64>>,
}

impl<R: Ranged<ValueType = f64>> Ranged for Ticks<R> {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        match &self.ticks {
            // Given ticks are bold; no light grid lines between them.
            Some(_) if hint.weight().allow_light_points() => Vec::new(),
            Some(ticks) => ticks.clone(),
            None => self.inner.key_points(hint),
        }
    }

    fn axis_pixel_range(&self, limit: (i32, i32)) -> Range<i32> {
        self.inner.axis_pixel_range(limit)
    }
}

fn draw_axes<X, Y>(
    area: &DrawingArea<BitMapBackend, Shift>,
    panel: &Panel,
    points: &[Vec<(f64, f64)>],
    x: X,
    y: Y,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .x_label_formatter(&|v| number(*v))
        .y_label_formatter(&|v| number(*v))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(plot_error)?;
    for (i, (series, pts)) in panel.series.iter().zip(points).enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(series.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_error)?;
        // Error bars: a vertical line from low to high with 8-pixel caps.
        for (x, low, high) in visible_bars(panel, series) {
            let cap =
                |y: f64| EmptyElement::at((x, y)) + PathElement::new(vec![(-4, 0), (4, 0)], color);
            chart
                .draw_series([PathElement::new(vec![(x, low), (x, high)], color)])
                .map_err(plot_error)?;
            chart
                .draw_series([cap(low), cap(high)])
                .map_err(plot_error)?;
        }
    }
    if !panel.series.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_error)?;
    }
    Ok(())
}

/// Axis labels: integers plainly, large values shortened (12k, 1.5M), fractions with up to
/// three decimals, tiny values in scientific notation.
fn number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{}M", trimmed(v / 1e6, 2))
    } else if a >= 1e4 {
        format!("{}k", trimmed(v / 1e3, 1))
    } else if a >= 1.0 && v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 0.01 {
        trimmed(v, 3)
    } else {
        format!("{v:.1e}")
    }
}

/// `v` with `decimals` decimals, trailing zeros dropped.
fn trimmed(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}
