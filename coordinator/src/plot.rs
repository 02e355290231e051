//! A line chart drawn into an RGB raster and encoded as PNG: the job's loss curve (left axis)
//! and evaluation accuracies (right axis) against the step, saved beside the model and served
//! at `/loss.png`. Text uses a built-in 5x7 pixel font (digits, lower-case letters and a few
//! signs), drawn at twice its size; nice tick values are 1, 2 or 5 times a power of ten.

/// One line of the chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    /// (x, y) points in x order; non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
    /// Drawn against the right axis (else the left one).
    pub right_axis: bool,
}

const W: usize = 960;
const H: usize = 480;
const LEFT: usize = 100;
const RIGHT: usize = 100;
const TOP: usize = 50;
const BOTTOM: usize = 60;
const SCALE: usize = 2;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [30, 30, 30];
const GRID: Rgb = [225, 225, 225];
const COLOURS: [Rgb; 4] = [[31, 100, 180], [220, 110, 20], [40, 150, 60], [170, 40, 150]];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas { px: WHITE.iter().copied().cycle().take(W * H * 3).collect() }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.set(x, y, c);
            }
        }
    }

    /// A line `width` pixels thick (Bresenham, each point a square).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), width: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let h = width / 2;
        loop {
            self.rect(x - h, y - h, x - h + width - 1, y - h + width - 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x + (k * 6 * SCALE) as i64;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        let (px, py) = (gx + (col * SCALE) as i64, y + (r * SCALE) as i64);
                        self.rect(px, py, px + SCALE as i64 - 1, py + SCALE as i64 - 1, c);
                    }
                }
            }
        }
    }
}

fn text_width(s: &str) -> i64 {
    (s.chars().count() * 6 * SCALE) as i64
}

/// Rows of a 5x7 glyph, the leftmost pixel in bit 4. Unknown characters are blank.
fn glyph(c: char) -> [u8; 7] {
    const GLYPHS: &[(char, [u8; 7])] = &[
        ('0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]),
        ('1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
        ('2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]),
        ('3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
        ('4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]),
        ('5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
        ('6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]),
        ('7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
        ('8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]),
        ('9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
        ('.', [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C]),
        ('-', [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00]),
        ('+', [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00]),
        (':', [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00]),
        ('/', [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00]),
        ('(', [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02]),
        (')', [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08]),
        ('_', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F]),
        ('a', [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F]),
        ('b', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E]),
        ('c', [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E]),
        ('d', [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F]),
        ('e', [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E]),
        ('f', [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08]),
        ('g', [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E]),
        ('h', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11]),
        ('i', [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E]),
        ('j', [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C]),
        ('k', [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12]),
        ('l', [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
        ('m', [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11]),
        ('n', [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11]),
        ('o', [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E]),
        ('p', [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10]),
        ('q', [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01]),
        ('r', [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10]),
        ('s', [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E]),
        ('t', [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06]),
        ('u', [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D]),
        ('v', [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04]),
        ('w', [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A]),
        ('x', [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11]),
        ('y', [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E]),
        ('z', [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F]),
    ];
    let c = c.to_ascii_lowercase();
    GLYPHS.iter().find(|(g, _)| *g == c).map_or([0; 7], |(_, rows)| *rows)
}

/// About `n` round tick values covering [lo, hi], and the range they span.
fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64, f64) {
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, lo + 0.5) };
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let (first, last) = ((lo / step).floor() * step, (hi / step).ceil() * step);
    let count = ((last - first) / step).round() as usize;
    ((0..=count).map(|k| first + k as f64 * step).collect(), first, last)
}

/// A tick label: few digits, no trailing zeros.
fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

fn finite(points: &[(f64, f64)]) -> impl Iterator<Item = &(f64, f64)> {
    points.iter().filter(|(x, y)| x.is_finite() && y.is_finite())
}

/// Draws `series` against a shared x axis and encodes the chart as a PNG.
pub fn line_chart_png(series: &[Series], x_name: &str, left_name: &str, right_name: &str) -> Vec<u8> {
    let mut c = Canvas::new();
    let (px0, px1, py0, py1) = (LEFT as i64, (W - RIGHT) as i64, TOP as i64, (H - BOTTOM) as i64);
    let range = |right: bool, axis: usize| {
        let vals = series.iter().filter(|s| s.right_axis == right).flat_map(|s| finite(&s.points));
        vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            let v = if axis == 0 { p.0 } else { p.1 };
            (lo.min(v), hi.max(v))
        })
    };
    let (xl, xh) = {
        let (a, b) = range(false, 0);
        let (c2, d) = range(true, 0);
        (a.min(c2), b.max(d))
    };
    let empty = !xl.is_finite();
    let (xticks, x0, x1) = if empty { ticks(0.0, 1.0, 8) } else { ticks(xl, xh, 8) };
    let (yl, yh) = range(false, 1);
    let (lticks, l0, l1) = if yl.is_finite() { ticks(yl, yh, 6) } else { ticks(0.0, 1.0, 6) };
    let (rl, rh) = range(true, 1);
    let has_right = rl.is_finite();
    let (rticks, r0, r1) = if has_right { ticks(rl, rh, 6) } else { ticks(0.0, 1.0, 6) };
    let sx = |x: f64| px0 + ((x - x0) / (x1 - x0) * (px1 - px0) as f64).round() as i64;
    let sy = |y: f64, lo: f64, hi: f64| py1 - ((y - lo) / (hi - lo) * (py1 - py0) as f64).round() as i64;

    for &t in &lticks {
        let y = sy(t, l0, l1);
        c.line((px0, y), (px1, y), 1, GRID);
        let l = label(t);
        c.text(px0 - 8 - text_width(&l), y - 7, &l, BLACK);
    }
    for &t in &xticks {
        let x = sx(t);
        c.line((x, py0), (x, py1), 1, GRID);
        let l = label(t);
        c.text(x - text_width(&l) / 2, py1 + 8, &l, BLACK);
    }
    if has_right {
        for &t in &rticks {
            let l = label(t);
            c.text(px1 + 8, sy(t, r0, r1) - 7, &l, BLACK);
        }
        c.text(W as i64 - 8 - text_width(right_name), py0 - 36, right_name, BLACK);
    }
    c.line((px0, py0), (px0, py1), 2, BLACK);
    c.line((px0, py1), (px1, py1), 2, BLACK);
    c.line((px1, py0), (px1, py1), 1, BLACK);
    c.text(px0 - 80, py0 - 36, left_name, BLACK);
    c.text((px0 + px1) / 2 - text_width(x_name) / 2, py1 + 34, x_name, BLACK);

    for (k, s) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let (lo, hi) = if s.right_axis { (r0, r1) } else { (l0, l1) };
        let pts: Vec<(i64, i64)> = finite(&s.points).map(|&(x, y)| (sx(x), sy(y, lo, hi))).collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], 2, colour);
        }
        if s.right_axis || pts.len() == 1 {
            for &(x, y) in &pts {
                c.rect(x - 3, y - 3, x + 3, y + 3, colour);
            }
        }
    }
    // The legend, top right inside the plot, on white over the lines.
    let legend_w = series.iter().map(|s| text_width(&s.name)).max().unwrap_or(0) + 48;
    let lx = px1 - 8 - legend_w;
    if !series.is_empty() {
        c.rect(lx, py0 + 4, px1 - 8, py0 + 12 + 22 * series.len() as i64, WHITE);
    }
    for (k, s) in series.iter().enumerate() {
        let ly = py0 + 10 + 22 * k as i64;
        c.rect(lx + 8, ly + 4, lx + 32, ly + 8, COLOURS[k % COLOURS.len()]);
        c.text(lx + 40, ly, &s.name, BLACK);
    }
    if empty {
        c.text(px0 + 200, (py0 + py1) / 2, "no steps yet", BLACK);
    }
    encode(&c.px)
}

fn encode(px: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, W as u32, H as u32);
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

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, lo, hi) = ticks(0.37, 2.9, 6);
        assert_eq!(t, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
        assert_eq!((lo, hi), (0.0, 3.0));
        let (t, _, _) = ticks(1.0, 1.0, 5);
        assert!(t.len() >= 2);
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(label(0.5), "0.5");
        assert_eq!(label(100.0), "100");
        assert_eq!(label(2e-5), "2.0e-5");
        assert_eq!(label(-0.0), "0");
    }

    #[test]
    fn a_chart_is_a_png_of_the_declared_size() {
        let s = Series {
            name: "train loss".into(),
            points: vec![(1.0, 0.7), (2.0, 0.5), (3.0, f64::NAN)],
            right_axis: false,
        };
        let png = line_chart_png(&[s], "step", "loss", "accuracy");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let d = png::Decoder::new(std::io::Cursor::new(&png));
        let r = d.read_info().unwrap();
        assert_eq!((r.info().width, r.info().height), (W as u32, H as u32));
    }
}
