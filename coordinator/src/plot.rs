//! The job's loss chart as a PNG (plotters over an RGB buffer, encoded with `png`): the
//! training loss per step (faint) with a smoothed line over it on the left axis, and each
//! split's evaluation accuracy (points joined by lines) on the right axis, against the step.
//! Saved beside the model and served at `/loss.png`. The legend sits in a strip above the plot,
//! so it never covers a curve; the text uses DejaVu Sans embedded in the binary (no system
//! fonts at run time).

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::sync::Once;

/// One line of the chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    /// (x, y) points in x order; non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Style {
    /// Left axis: every point, faint, with a smoothed line drawn over it (TensorBoard's
    /// debiased exponential moving average, weight 0.9).
    Noisy,
    /// Right axis: points marked and joined (a single point is a visible marker).
    Marked,
}

pub const W: u32 = 960;
pub const H: u32 = 480;
/// The legend strip above the plot.
pub const LEGEND_H: u32 = 36;
pub const COLOURS: [RGBColor; 5] = [
    RGBColor(31, 100, 180),
    RGBColor(220, 110, 20),
    RGBColor(40, 150, 60),
    RGBColor(170, 40, 150),
    RGBColor(120, 120, 120),
];
const SMOOTHING: f64 = 0.9;

fn finite(points: &[(f64, f64)]) -> impl Iterator<Item = (f64, f64)> + '_ {
    points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite())
}

/// TensorBoard's smoothing: an exponential moving average, debiased at the start.
pub fn smoothed(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let (mut ema, mut n) = (0.0, 0);
    finite(points)
        .map(|(x, y)| {
            ema = ema * weight + (1.0 - weight) * y;
            n += 1;
            (x, ema / (1.0 - weight.powi(n)))
        })
        .collect()
}

/// The range of `values`, padded by 5% (a flat series by ±0.5), or `fallback` when empty.
fn padded(values: impl Iterator<Item = f64>, fallback: (f64, f64)) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return fallback;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - pad, hi + pad)
}

fn register_fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        let registered = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
        assert!(registered.is_ok(), "the embedded DejaVu Sans parses");
    });
}

/// Draws `series` against a shared x axis and encodes the chart as a PNG.
pub fn line_chart_png(series: &[Series], x_name: &str, left_name: &str, right_name: &str) -> Vec<u8> {
    register_fonts();
    let mut px = vec![255u8; (W * H * 3) as usize];
    draw(&mut px, series, x_name, left_name, right_name).expect("drawing into memory cannot fail");
    encode(&px)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(px: &mut [u8], series: &[Series], x_name: &str, left_name: &str, right_name: &str) -> DrawResult {
    let root = BitMapBackend::with_buffer(px, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let (legend, plot) = root.split_vertically(LEGEND_H);
    let on = |s: &&Series, style| s.style == style;
    let (x0, x1) = padded(series.iter().flat_map(|s| finite(&s.points)).map(|p| p.0), (0.0, 1.0));
    let (r0, r1) =
        padded(series.iter().filter(|s| on(s, Style::Marked)).flat_map(|s| finite(&s.points)).map(|p| p.1), (0.0, 1.0));
    // Without a left-axis series, the left axis repeats the right one.
    let has_left = series.iter().any(|s| s.style == Style::Noisy);
    let (l0, l1) = if has_left {
        padded(series.iter().filter(|s| on(s, Style::Noisy)).flat_map(|s| finite(&s.points)).map(|p| p.1), (0.0, 1.0))
    } else {
        (r0, r1)
    };
    let left_name = if has_left { left_name } else { right_name };
    let font = ("sans-serif", 15).into_font();
    let mut chart = ChartBuilder::on(&plot)
        .margin_left(10)
        .margin_right(10)
        .margin_bottom(8)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .right_y_label_area_size(64)
        .build_cartesian_2d(x0.max(0.0)..x1, l0..l1)?
        .set_secondary_coord(x0.max(0.0)..x1, r0..r1);
    chart
        .configure_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_desc(x_name)
        .y_desc(left_name)
        .label_style(font.clone())
        .axis_desc_style(font.clone())
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc(right_name)
        .label_style(font.clone())
        .axis_desc_style(font.clone())
        .draw()?;
    for (k, s) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        match s.style {
            Style::Noisy => {
                chart.draw_series(LineSeries::new(finite(&s.points), colour.mix(0.25).stroke_width(1)))?;
                chart.draw_series(LineSeries::new(smoothed(&s.points, SMOOTHING), colour.stroke_width(2)))?;
            }
            Style::Marked => {
                chart.draw_secondary_series(LineSeries::new(finite(&s.points), colour.stroke_width(2)))?;
                chart.draw_secondary_series(finite(&s.points).map(|p| Circle::new(p, 5, colour.filled())))?;
            }
        }
    }
    // The legend: a swatch and the name of each series, left to right.
    let mut x = 74;
    for (k, s) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let y = (LEGEND_H / 2) as i32;
        legend.draw(&PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3)))?;
        if s.style == Style::Marked {
            legend.draw(&Circle::new((x + 12, y), 5, colour.filled()))?;
        }
        let name = if s.style == Style::Noisy { format!("{} (raw, smoothed)", s.name) } else { s.name.clone() };
        legend.draw(&Text::new(name.clone(), (x + 32, y - 8), font.clone()))?;
        let (w, _) = legend.estimate_text_size(&name, &TextStyle::from(font.clone()))?;
        x += 32 + w as i32 + 28;
    }
    if series.iter().all(|s| finite(&s.points).next().is_none()) {
        plot.draw(&Text::new("no steps yet", ((W / 2 - 40) as i32, (H / 2) as i32), font))?;
    }
    root.present()?;
    Ok(())
}

fn encode(px: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, W, H);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().expect("a PNG header goes into memory");
    w.write_image_data(px).expect("the raster has the header's size");
    w.finish().expect("a PNG ends in memory");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png: &[u8]) -> Vec<u8> {
        let d = png::Decoder::new(std::io::Cursor::new(png));
        let mut r = d.read_info().unwrap();
        assert_eq!((r.info().width, r.info().height), (W, H));
        let mut px = vec![0; r.output_buffer_size().unwrap()];
        r.next_frame(&mut px).unwrap();
        px
    }

    /// Pixels of exactly `c` below the legend strip.
    fn in_plot(px: &[u8], c: RGBColor) -> usize {
        px.chunks(3).skip((LEGEND_H * W) as usize).filter(|p| p == &[c.0, c.1, c.2]).count()
    }

    #[test]
    fn smoothing_is_debiased_and_skips_non_finite_points() {
        let s = smoothed(&[(1.0, 2.0), (2.0, f64::NAN), (3.0, 2.0), (4.0, 4.0)], 0.9);
        assert_eq!(s.len(), 3);
        assert!((s[0].1 - 2.0).abs() < 1e-12 && (s[1].1 - 2.0).abs() < 1e-12);
        assert!(s[2].1 > 2.0 && s[2].1 < 4.0);
    }

    #[test]
    fn every_series_is_visible_and_a_single_point_too() {
        let loss = Series {
            name: "train loss".into(),
            points: (1..=200).map(|i| (f64::from(i), 0.7 / f64::from(i).sqrt() + 0.05 * f64::from(i % 7))).collect(),
            style: Style::Noisy,
        };
        // A dev curve that ends at the chart's top right corner, where a legend inside the plot
        // would sit, and one test point.
        let dev = Series {
            name: "dev accuracy".into(),
            points: vec![(50.0, 0.70), (100.0, 0.80), (200.0, 0.86)],
            style: Style::Marked,
        };
        let test = Series { name: "test accuracy".into(), points: vec![(200.0, 0.84)], style: Style::Marked };
        let png = line_chart_png(&[loss, dev, test], "step", "loss", "accuracy");
        let px = decode(&png);
        assert!(in_plot(&px, COLOURS[0]) > 300, "the smoothed loss is drawn");
        assert!(in_plot(&px, COLOURS[1]) > 200, "the dev accuracy is drawn");
        assert!(in_plot(&px, COLOURS[2]) > 40, "the single test point is drawn as a marker");
    }

    #[test]
    fn an_empty_chart_is_a_png_of_the_declared_size() {
        decode(&line_chart_png(&[], "step", "loss", "accuracy"));
        let nan = Series { name: "train loss".into(), points: vec![(1.0, f64::NAN)], style: Style::Noisy };
        decode(&line_chart_png(&[nan], "step", "loss", "accuracy"));
    }
}
