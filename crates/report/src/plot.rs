//! `loss.png`: the train (and eval) loss against the step (and for DPO `rewards.png`, the reward
//! margin), drawn by a small anti-aliased rasterizer with the built-in 5x7 font and encoded with
//! the `png` crate; no plotting library or font file needed.

use super::font;

/// Background.
const BG: [u8; 3] = [255, 255, 255];
/// Frame and tick marks.
const AXIS: [u8; 3] = [64, 64, 64];
/// Grid lines.
const GRID: [u8; 3] = [228, 228, 228];
/// Labels.
const INK: [u8; 3] = [34, 34, 34];
/// Train curve (matplotlib's first colour).
pub const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
/// Eval curve and markers (matplotlib's second colour).
pub const EVAL_COLOR: [u8; 3] = [255, 127, 14];
/// Font scale: one font pixel is a 2x2 block, so digits are 10x14 pixels.
const SCALE: u32 = 2;

/// Where the data lies on the image: the plot area in pixels and the data range it shows.
#[derive(Debug, Clone, Copy)]
struct Frame {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn px(&self, x: f64, y: f64) -> (f64, f64) {
        let fx = (x - self.x0) / (self.x1 - self.x0);
        let fy = (y - self.y0) / (self.y1 - self.y0);
        (self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top))
    }
}

/// An RGB image being drawn.
struct Canvas {
    w: u32,
    h: u32,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(w: u32, h: u32) -> Self {
        let mut rgb = Vec::with_capacity((w * h * 3) as usize);
        for _ in 0..w * h {
            rgb.extend_from_slice(&BG);
        }
        Canvas { w, h, rgb }
    }

    fn blend(&mut self, x: i64, y: i64, c: [u8; 3], alpha: f32) {
        if x < 0 || y < 0 || x >= self.w as i64 || y >= self.h as i64 || alpha <= 0.0 {
            return;
        }
        let i = ((y as u32 * self.w + x as u32) * 3) as usize;
        let a = alpha.min(1.0);
        for (px, &ck) in self.rgb[i..i + 3].iter_mut().zip(&c) {
            let old = f32::from(*px);
            *px = (old + (f32::from(ck) - old) * a).round() as u8;
        }
    }

    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.blend(x, y, c, 1.0);
            }
        }
    }

    /// `text` with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, text: &str, c: [u8; 3]) {
        let s = SCALE as i64;
        for (i, ch) in text.chars().enumerate() {
            let gx = x + i as i64 * font::ADVANCE as i64 * s;
            for (row, bits) in font::glyph(ch).iter().enumerate() {
                for (col, b) in bits.chars().enumerate() {
                    if b == '#' {
                        let (px, py) = (gx + col as i64 * s, y + row as i64 * s);
                        self.fill(px, py, px + s, py + s, c);
                    }
                }
            }
        }
    }

    /// Stroke a polyline (or, for one point, a dot) `width` pixels wide, anti-aliased, clipped
    /// to `clip` (x0, y0, x1, y1).
    fn stroke(&mut self, pts: &[(f64, f64)], width: f64, c: [u8; 3], clip: (f64, f64, f64, f64)) {
        let r = width / 2.0;
        let mut cov = std::collections::HashMap::<(i64, i64), f32>::new();
        let segments: Vec<((f64, f64), (f64, f64))> = if pts.len() == 1 {
            vec![(pts[0], pts[0])]
        } else {
            pts.windows(2).map(|w| (w[0], w[1])).collect()
        };
        for (a, b) in segments {
            let x0 = (a.0.min(b.0) - r - 1.0).max(clip.0).floor() as i64;
            let x1 = (a.0.max(b.0) + r + 1.0).min(clip.2).ceil() as i64;
            let y0 = (a.1.min(b.1) - r - 1.0).max(clip.1).floor() as i64;
            let y1 = (a.1.max(b.1) + r + 1.0).min(clip.3).ceil() as i64;
            for y in y0..y1 {
                for x in x0..x1 {
                    let d = dist_to_segment((x as f64 + 0.5, y as f64 + 0.5), a, b);
                    let v = (r + 0.5 - d).clamp(0.0, 1.0) as f32;
                    if v > 0.0 {
                        let e = cov.entry((x, y)).or_insert(0.0);
                        *e = e.max(v);
                    }
                }
            }
        }
        for ((x, y), v) in cov {
            self.blend(x, y, c, v);
        }
    }
}

fn dist_to_segment(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 == 0.0 { 0.0 } else { (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0) };
    let (qx, qy) = (a.0 + t * dx, a.1 + t * dy);
    ((p.0 - qx).powi(2) + (p.1 - qy).powi(2)).sqrt()
}

/// A "nice" tick spacing (1, 2 or 5 times a power of ten) giving about `target` ticks.
fn nice_step(range: f64, target: f64) -> f64 {
    let raw = (range / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Tick values in `[lo, hi]` at multiples of `step`.
fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let (k0, k1) = ((lo / step - 1e-9).ceil() as i64, (hi / step + 1e-9).floor() as i64);
    (k0..=k1).map(|k| k as f64 * step).collect()
}

/// A tick label with as many decimals as the spacing needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (-(step.log10() + 1e-9).floor()).max(0.0) as usize;
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s.trim_start_matches(['-', '0', '.']).is_empty() { s[1..].to_owned() } else { s }
}

/// A value for the legend: 4 significant digits.
fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        let decimals = (3 - v.abs().max(1e-300).log10().floor() as i64).clamp(0, 6) as usize;
        format!("{v:.decimals$}")
    }
}

/// One curve of a plot: (step, value) points.
#[derive(Debug, Clone)]
pub struct Curve {
    /// Its legend entry (the last value is appended).
    pub label: String,
    /// Line colour.
    pub color: [u8; 3],
    /// The points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// Whether each point is also marked (sparse curves such as evaluations).
    pub markers: bool,
}

/// The loss plot as an RGB image, with the mapping from data to pixels kept so callers (and
/// tests) can find where a point was drawn.
#[derive(Debug, Clone)]
pub struct LossPlot {
    rgb: Vec<u8>,
    frame: Option<Frame>,
}

impl LossPlot {
    /// Image width in pixels.
    pub const WIDTH: u32 = 960;
    /// Image height in pixels.
    pub const HEIGHT: u32 = 600;

    /// Draw `train` and `eval` as (step, loss) points under `title`; non-finite points are
    /// skipped, and a plot without points says so.
    pub fn render(title: &str, train: &[(f64, f64)], eval: &[(f64, f64)]) -> LossPlot {
        let curve = |label: &str, color, points: &[(f64, f64)], markers| Curve {
            label: label.into(),
            color,
            points: points.to_vec(),
            markers,
        };
        Self::render_curves(
            title,
            "loss",
            &[curve("train loss", TRAIN_COLOR, train, false), curve("eval loss", EVAL_COLOR, eval, true)],
        )
    }

    /// Draw `curves` against the step under `title`, the y axis named `y_label`.
    pub fn render_curves(title: &str, y_label: &str, curves: &[Curve]) -> LossPlot {
        let (w, h) = (Self::WIDTH, Self::HEIGHT);
        let mut cv = Canvas::new(w, h);
        let ch = (font::HEIGHT * SCALE) as i64;
        let text_w = |s: &str| (font::text_width(s) * SCALE) as i64;
        let curves: Vec<Curve> = curves
            .iter()
            .map(|c| Curve {
                points: c.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect(),
                ..c.clone()
            })
            .collect();
        let all: Vec<(f64, f64)> = curves.iter().flat_map(|c| c.points.iter().copied()).collect();

        let title = if title.chars().count() > 70 {
            format!("{}...", title.chars().take(67).collect::<String>())
        } else {
            title.to_owned()
        };
        cv.text(w as i64 / 2 - text_w(&title) / 2, 14, &title, INK);
        let (top, bottom, right) = (64.0, h as f64 - 66.0, w as f64 - 28.0);

        if all.is_empty() {
            let left = 80.0;
            frame_rect(&mut cv, left, top, right, bottom);
            let msg = format!("no {y_label} was logged");
            let msg = msg.as_str();
            cv.text(((left + right) / 2.0) as i64 - text_w(msg) / 2, ((top + bottom) / 2.0) as i64, msg, INK);
            return LossPlot { rgb: cv.rgb, frame: None };
        }

        let (mut x0, mut x1) = min_max(all.iter().map(|p| p.0));
        let (mut y0, mut y1) = min_max(all.iter().map(|p| p.1));
        if x1 - x0 < 1e-9 {
            (x0, x1) = (x0 - 1.0, x1 + 1.0);
        }
        if y1 - y0 < 1e-12 * y1.abs().max(1.0) {
            let pad = (y1.abs() * 0.05).max(0.05);
            (y0, y1) = (y0 - pad, y1 + pad);
        }
        let (px, py) = ((x1 - x0) * 0.02, (y1 - y0) * 0.06);
        let (x0, x1, y0, y1) = (x0 - px, x1 + px, y0 - py, y1 + py);
        let xstep = nice_step(x1 - x0, 7.0).max(1.0);
        let ystep = nice_step(y1 - y0, 6.0);
        let xticks = ticks(x0, x1, xstep);
        let yticks = ticks(y0, y1, ystep);
        let ylabels: Vec<String> = yticks.iter().map(|&v| tick_label(v, ystep)).collect();
        let label_w = ylabels.iter().map(|s| text_w(s)).max().unwrap_or(0).max(text_w(y_label));
        let left = (16 + label_w + 12) as f64;
        let f = Frame { left, top, right, bottom, x0, x1, y0, y1 };

        // Grid.
        for &t in &xticks {
            let x = f.px(t, y0).0.round() as i64;
            cv.fill(x, top as i64, x + 1, bottom as i64, GRID);
        }
        for &t in &yticks {
            let y = f.px(x0, t).1.round() as i64;
            cv.fill(left as i64, y, right as i64, y + 1, GRID);
        }
        // Curves, clipped to the plot area.
        let clip = (left + 1.0, top + 1.0, right, bottom);
        for c in &curves {
            let pts: Vec<(f64, f64)> = c.points.iter().map(|&(x, y)| f.px(x, y)).collect();
            if pts.len() > 1 {
                cv.stroke(&pts, 2.0, c.color, clip);
            }
            if c.markers || pts.len() == 1 {
                for &p in &pts {
                    cv.stroke(&[p], 7.0, c.color, clip);
                }
            }
        }
        // Frame, ticks and labels.
        frame_rect(&mut cv, left, top, right, bottom);
        for &t in &xticks {
            let x = f.px(t, y0).0.round() as i64;
            cv.fill(x, bottom as i64, x + 1, bottom as i64 + 6, AXIS);
            let s = tick_label(t, xstep);
            cv.text(x - text_w(&s) / 2, bottom as i64 + 10, &s, INK);
        }
        for (&t, s) in yticks.iter().zip(&ylabels) {
            let y = f.px(x0, t).1.round() as i64;
            cv.fill(left as i64 - 6, y, left as i64, y + 1, AXIS);
            cv.text(left as i64 - 10 - text_w(s), y - ch / 2, s, INK);
        }
        let xl = "step";
        cv.text(((left + right) / 2.0) as i64 - text_w(xl) / 2, bottom as i64 + 14 + ch + 8, xl, INK);
        cv.text(left as i64 - 10 - text_w(y_label), top as i64 - ch - 12, y_label, INK);

        // Legend, top right inside the plot.
        let entries: Vec<(String, [u8; 3], bool)> = curves
            .iter()
            .filter_map(|c| {
                c.points
                    .last()
                    .map(|&(_, y)| (format!("{} (last {})", c.label, short(y)), c.color, c.markers))
            })
            .collect();
        let row_h = ch + 10;
        let box_w = 12 + 30 + 10 + entries.iter().map(|e| text_w(&e.0)).max().unwrap_or(0) + 12;
        let box_h = 10 + row_h * entries.len() as i64;
        let (bx, by) = (right as i64 - 12 - box_w, top as i64 + 12);
        cv.fill(bx, by, bx + box_w, by + box_h, BG);
        outline(&mut cv, bx, by, bx + box_w, by + box_h, [200, 200, 200]);
        for (i, (label, color, marker)) in entries.iter().enumerate() {
            let cy = by + 5 + row_h * i as i64 + row_h / 2;
            let whole = (0.0, 0.0, w as f64, h as f64);
            cv.stroke(&[((bx + 12) as f64, cy as f64), ((bx + 42) as f64, cy as f64)], 2.0, *color, whole);
            if *marker {
                cv.stroke(&[((bx + 27) as f64, cy as f64)], 7.0, *color, whole);
            }
            cv.text(bx + 52, cy - ch / 2, label, INK);
        }
        LossPlot { rgb: cv.rgb, frame: Some(f) }
    }

    /// The pixel (column, row) where the point (step, loss) is drawn; `None` for a plot without
    /// data or a point outside its range.
    pub fn pixel(&self, step: f64, loss: f64) -> Option<(u32, u32)> {
        let f = self.frame?;
        let (x, y) = f.px(step, loss);
        let inside = x >= f.left && x <= f.right && y >= f.top && y <= f.bottom;
        inside.then_some((x as u32, y as u32))
    }

    /// Row-major RGB bytes, `WIDTH * HEIGHT * 3` of them.
    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// The image as PNG bytes (8-bit RGB).
    pub fn to_png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, Self::WIDTH, Self::HEIGHT);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.rgb)?;
        writer.finish()?;
        Ok(out)
    }
}

fn min_max(it: impl Iterator<Item = f64>) -> (f64, f64) {
    it.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

fn outline(cv: &mut Canvas, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
    cv.fill(x0, y0, x1, y0 + 1, c);
    cv.fill(x0, y1 - 1, x1, y1, c);
    cv.fill(x0, y0, x0 + 1, y1, c);
    cv.fill(x1 - 1, y0, x1, y1, c);
}

fn frame_rect(cv: &mut Canvas, left: f64, top: f64, right: f64, bottom: f64) {
    outline(cv, left as i64, top as i64, right as i64 + 1, bottom as i64 + 1, AXIS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_and_labels() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(1000.0, 7.0), 100.0);
        assert!((nice_step(0.37, 6.0) - 0.05).abs() < 1e-12);
        assert_eq!(ticks(0.12, 0.5, 0.1).len(), 4);
        assert_eq!(tick_label(0.30000000000000004, 0.05), "0.30");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
        assert_eq!(tick_label(-0.0, 0.1), "0.0");
        assert_eq!(short(1.23456), "1.235");
        assert_eq!(short(0.012345), "0.01235");
    }

    #[test]
    fn empty_and_single_point_plots_render() {
        let empty = LossPlot::render("run", &[], &[]);
        assert_eq!(empty.rgb().len(), (LossPlot::WIDTH * LossPlot::HEIGHT * 3) as usize);
        assert_eq!(empty.pixel(1.0, 1.0), None);
        let one = LossPlot::render("run", &[(1.0, 2.0)], &[(f64::NAN, 1.0)]);
        let (x, y) = one.pixel(1.0, 2.0).expect("point inside");
        let i = ((y * LossPlot::WIDTH + x) * 3) as usize;
        assert_eq!(&one.rgb()[i..i + 3], &TRAIN_COLOR);
    }
}
