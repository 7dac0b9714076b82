//! The little SVG the reports draw: a frame with a title, horizontal grid
//! lines with their labels, polylines and a legend on the right. Both plots
//! (`latency.svg` of a run, `lifecycle.svg`) are drawn with it.

use std::fmt::Write;

/// A plot's size and margins, in pixels.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    /// Width of the whole image.
    pub w: f64,
    /// Height of the whole image.
    pub h: f64,
    /// Room for the value labels.
    pub left: f64,
    /// Room for the x axis labels.
    pub bottom: f64,
    /// Room for the title.
    pub top: f64,
    /// Room for the legend.
    pub right: f64,
}

impl Frame {
    /// The middle of the plotting area, where titles are centred.
    pub fn middle(&self) -> f64 {
        (self.w - self.right + self.left) / 2.0
    }

    /// Opens the image: background and title.
    pub fn open(&self, title: &str) -> String {
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">{title}</text>
"#,
            self.w,
            self.h,
            self.middle()
        )
    }

    /// A horizontal grid line at `y`, labelled on the left.
    pub fn grid(&self, s: &mut String, y: f64, label: &str) {
        let _ = writeln!(
            s,
            r##"<line x1="{}" x2="{}" y1="{y}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
            self.left,
            self.w - self.right,
            self.left - 6.0,
            y + 4.0,
        );
    }

    /// Centred text under the plot (an axis title), at height `y`.
    pub fn caption(&self, s: &mut String, y: f64, text: &str) {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{y}" text-anchor="middle">{text}</text>"#,
            self.middle()
        );
    }

    /// A line through `points`, and its legend entry at height `legend_y`.
    pub fn series(&self, s: &mut String, line: &Line<'_>, points: &[(f64, f64)], legend_y: f64) {
        let points: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let Line {
            name,
            color,
            width,
            dash,
        } = line;
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" stroke-dasharray="{dash}" points="{}"/>"#,
            points.join(" ")
        );
        let lx = self.w - self.right + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{}">{name}</text>"#,
            lx + 24.0,
            lx + 30.0,
            legend_y + 4.0
        );
    }

    /// Closes the image.
    pub fn close(s: &mut String) {
        s.push_str("</svg>\n");
    }
}

/// How a series is drawn and named.
pub struct Line<'a> {
    /// The series' name in the legend.
    pub name: &'a str,
    /// Stroke colour.
    pub color: &'a str,
    /// Stroke width.
    pub width: f64,
    /// `stroke-dasharray`; empty for a solid line.
    pub dash: &'a str,
}
