//! The benchmark matrix as one SVG a reader understands without the JSON: a bar panel per
//! metric (each says whether higher or lower is better), bars coloured by capture mode and
//! labelled with their value, and a panel with the ratios and what each configuration is.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::matrix::{CONFIGS, METRICS, Machine, Result1, ebpf_over_iptables, get};

/// DejaVu Sans from Debian's fonts-dejavu-core (`cargo xtask setup` installs it): plotters
/// lays text out with it; the SVG names the family, so viewers use their own copy.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FAMILY: &str = "sans-serif";

const GREY: RGBColor = RGBColor(140, 140, 140);
const ORANGE: RGBColor = RGBColor(230, 126, 34);
const BLUE: RGBColor = RGBColor(41, 128, 185);

fn label(mode: &str, path: &str) -> String {
    match (mode, path) {
        ("direct", _) => "direct".to_owned(),
        (m, "passthrough") => format!("{} pass", short(m)),
        (m, _) => format!("{} HBONE", short(m)),
    }
}

fn short(mode: &str) -> &str {
    if mode == "ebpf" { "eBPF" } else { "iptables" }
}

fn colour(mode: &str, path: &str) -> ShapeStyle {
    let base = match mode {
        "direct" => GREY,
        "iptables" => ORANGE,
        _ => BLUE,
    };
    // Passthrough lighter, HBONE full: the mode is the hue, the path the shade.
    if path == "passthrough" {
        base.mix(0.55).filled()
    } else {
        base.filled()
    }
}

fn load_font() -> Result<()> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| {
                format!(
                    "read {FONT}: {e}; install Debian's fonts-dejavu-core (cargo xtask setup does)"
                )
            })?;
            // plotters keeps fonts for the process's life.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT} is not a usable font"))?;
            plotters::style::register_font(FAMILY, FontStyle::Bold, bytes)
                .map_err(|_| format!("{FONT} is not a usable font"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

pub fn draw(path: &Path, results: &[Result1], machine: &Machine, command: &str) -> Result<()> {
    load_font()?;
    let root = SVGBackend::new(path, (1500, 1350)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| anyhow!("draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (head, body) = root.split_vertically(90);
    head.draw_text(
        "sluice: what capture and the mesh cost, pod to pod across two nodes",
        &(FAMILY, 30)
            .into_font()
            .style(FontStyle::Bold)
            .color(&BLACK),
        (20, 14),
    )
    .map_err(|e| fail(&e))?;
    head.draw_text(
        &format!(
            "{} · medians of each configuration's runs · {command}",
            machine.describe()
        ),
        &(FAMILY, 18).into_font().color(&BLACK.mix(0.7)),
        (20, 54),
    )
    .map_err(|e| fail(&e))?;
    let panels = body.split_evenly((3, 2));
    for (panel, (metric, title, higher)) in panels.iter().zip(METRICS) {
        bars(panel, results, metric, title, higher).map_err(|e| fail(&e))?;
    }
    if let Some(notes_panel) = panels.get(METRICS.len()) {
        notes(notes_panel, results).map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

fn bars(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    results: &[Result1],
    metric: &str,
    title: &str,
    higher: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let values: Vec<f64> = CONFIGS
        .iter()
        .map(|(m, p)| get(results, m, p, metric).unwrap_or(0.0))
        .collect();
    let top = values.iter().copied().fold(0.0_f64, f64::max).max(1e-9) * 1.2;
    let caption = format!(
        "{title}, {} is better",
        if higher { "higher" } else { "lower" }
    );
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .caption(caption, (FAMILY, 20))
        .x_label_area_size(30)
        .y_label_area_size(55)
        // Integer ranges are inclusive in plotters: 0..=4 is five bars.
        .build_cartesian_2d((0..CONFIGS.len() - 1).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.08))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if *i < CONFIGS.len() => label(CONFIGS[*i].0, CONFIGS[*i].1),
            _ => String::new(),
        })
        .x_label_style((FAMILY, 16))
        .y_label_style((FAMILY, 15))
        .y_label_formatter(&|v| {
            if top >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .draw()?;
    for (i, ((mode, path), value)) in CONFIGS.iter().zip(&values).enumerate() {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *value),
            ],
            colour(mode, path),
        );
        bar.set_margin(0, 0, 10, 10);
        chart.draw_series(std::iter::once(bar))?;
        let text = if *value >= 100.0 {
            format!("{value:.0}")
        } else {
            format!("{value:.2}")
        };
        chart.draw_series(std::iter::once(Text::new(
            text,
            (SegmentValue::CenterOf(i), *value + top * 0.02),
            (FAMILY, 16)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )))?;
    }
    Ok(())
}

fn notes(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    results: &[Result1],
) -> Result<(), Box<dyn std::error::Error>> {
    let style = (FAMILY, 18).into_font().color(&BLACK);
    let bold = (FAMILY, 19)
        .into_font()
        .style(FontStyle::Bold)
        .color(&BLACK);
    let mut lines: Vec<(String, bool)> = vec![
        ("What each bar is".to_owned(), true),
        ("direct: no capture, no proxy".to_owned(), false),
        (
            "pass: captured, proxies in L4 passthrough".to_owned(),
            false,
        ),
        ("HBONE: meshed, HTTP/2 CONNECT in mTLS".to_owned(), false),
        ("orange: iptables capture, blue: eBPF".to_owned(), false),
        (String::new(), false),
        ("eBPF / iptables".to_owned(), true),
    ];
    for path in ["passthrough", "hbone"] {
        let ratio = |metric: &str| ebpf_over_iptables(results, path, metric);
        lines.push((
            format!(
                "{}: throughput {}, conn/s {}",
                if path == "hbone" { "HBONE" } else { "pass" },
                ratio("throughput_gbps"),
                ratio("connections_per_s")
            ),
            false,
        ));
    }
    lines.push((String::new(), false));
    lines.push(("eBPF HBONE vs direct".to_owned(), true));
    if let (Some(e), Some(d)) = (
        get(results, "ebpf", "hbone", "throughput_gbps"),
        get(results, "direct", "none", "throughput_gbps"),
    ) {
        lines.push((
            format!("throughput {:.2}× of direct", e / d.max(1e-9)),
            false,
        ));
    }
    if let (Some(e), Some(d)) = (
        get(results, "ebpf", "hbone", "rr_p50_us"),
        get(results, "direct", "none", "rr_p50_us"),
    ) {
        lines.push((format!("p50 latency {:+.0} µs", e - d), false));
    }
    let mut y = 30;
    for (line, heading) in lines {
        if !line.is_empty() {
            area.draw_text(&line, if heading { &bold } else { &style }, (30, y))?;
        }
        y += if heading { 30 } else { 27 };
    }
    Ok(())
}

/// Checks the chart is well-formed SVG naming every configuration (used by the tests).
pub fn check(svg: &str) -> Result<()> {
    if !svg.trim_start().starts_with("<svg") || !svg.trim_end().ends_with("</svg>") {
        return Err(anyhow!("not an SVG document"));
    }
    for (mode, path) in CONFIGS {
        let name = label(mode, path);
        svg.contains(&name)
            .then_some(())
            .with_context(|| format!("the chart does not name {name}"))?;
    }
    Ok(())
}
