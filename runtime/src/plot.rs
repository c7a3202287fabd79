//! Pictures as PNG: the loss curve of a training run (plotters) and an SVG
//! rendered (resvg), both with the DejaVu Sans Mono font compiled in so
//! that no system fonts are needed.

use plotters::prelude::*;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// Draws training loss (per step) and evaluation loss (at evaluations).
pub fn loss_curve(path: &Path, title: &str, train: &[(usize, f64)], eval: &[(usize, f64)]) -> Result<(), String> {
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let tmp = path.with_extension("tmp.png");
    draw(&tmp, title, train, eval).map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn draw(
    path: &Path,
    title: &str,
    train: &[(usize, f64)],
    eval: &[(usize, f64)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let finite = || train.iter().chain(eval).map(|(_, l)| *l).filter(|l| l.is_finite());
    let lo = finite().fold(f64::INFINITY, f64::min).min(f64::MAX);
    let hi = finite().fold(f64::NEG_INFINITY, f64::max).max(lo + 1e-3);
    let last = train.iter().chain(eval).map(|(s, _)| *s).max().unwrap_or(1).max(1);
    let pad = (hi - lo) * 0.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..last, (lo - pad)..(hi + pad))?;
    chart.configure_mesh().x_desc("step").y_desc("loss (nats per token)").label_style(("sans-serif", 14)).draw()?;
    let blue = RGBColor(66, 103, 178);
    chart
        .draw_series(LineSeries::new(train.iter().copied(), blue.stroke_width(1)))?
        .label("train")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], blue.stroke_width(2)));
    if !eval.is_empty() {
        let orange = RGBColor(230, 120, 20);
        chart
            .draw_series(LineSeries::new(eval.iter().copied(), orange.stroke_width(3)))?
            .label("eval")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], orange.stroke_width(3)));
        chart.draw_series(eval.iter().map(|p| Circle::new(*p, 3, orange.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

/// An SVG (`modelc graph`, `modelc plan`) rendered to PNG bytes, its text
/// in the compiled-in font whatever family it asks for.
pub fn svg_to_png(svg: &str) -> Result<Vec<u8>, String> {
    use resvg::{tiny_skia, usvg};
    let mut options = usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_font_data(FONT.to_vec());
    fonts.set_sans_serif_family("DejaVu Sans Mono");
    fonts.set_monospace_family("DejaVu Sans Mono");
    fonts.set_serif_family("DejaVu Sans Mono");
    let tree = usvg::Tree::from_str(svg, &options).map_err(|e| format!("bug: an SVG we wrote does not parse: {e}"))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).ok_or("the picture is too large for a PNG")?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| format!("cannot encode the PNG: {e}"))
}
