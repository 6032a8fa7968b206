//! A horizontal bar chart of speedups, written as plain SVG (no dependency, readable diffs).

/// One bar: a workload, its speedup (Python time / ours) and the target, if any.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub target: Option<f64>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Bars on a log2 axis from 1/2x to the largest power of two above the data, with a line at 1x
/// (parity with Python) and a tick at each bar's target.
pub fn speedup_chart(title: &str, bars: &[Bar]) -> String {
    let (label_w, plot_w, row_h, top, right) = (330.0, 560.0, 18.0, 60.0, 70.0);
    let lo = -1.0f64;
    let hi = bars
        .iter()
        .map(|b| b.value.max(b.target.unwrap_or(0.0)))
        .fold(4.0f64, f64::max)
        .log2()
        .ceil();
    let x = |v: f64| label_w + (v.max(2f64.powf(lo)).log2() - lo) / (hi - lo) * plot_w;
    let height = top + row_h * bars.len() as f64 + 50.0;
    let width = label_w + plot_w + right;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"13\" font-weight=\"bold\">{}</text>\n\
         <text x=\"10\" y=\"38\" fill=\"#555\">bar = Python time / ours (log scale); green: target met, \
         red: missed, blue: no target; black tick = target</text>\n",
        escape(title)
    );
    let mut p = lo;
    while p <= hi {
        let v = 2f64.powf(p);
        let gx = x(v);
        let (stroke, w) = if p == 0.0 { ("#000", 1.5) } else { ("#ddd", 1.0) };
        s += &format!(
            "<line x1=\"{gx:.1}\" y1=\"{:.1}\" x2=\"{gx:.1}\" y2=\"{:.1}\" stroke=\"{stroke}\" stroke-width=\"{w}\"/>\n\
             <text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#333\">{}x</text>\n",
            top - 6.0,
            top + row_h * bars.len() as f64,
            top + row_h * bars.len() as f64 + 16.0,
            if v < 1.0 { format!("{v}") } else { format!("{v:.0}") }
        );
        p += 1.0;
    }
    for (i, bar) in bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let color = match bar.target {
            Some(t) if bar.value >= t => "#3a9a4a",
            Some(_) => "#d04a3a",
            None => "#4a78c0",
        };
        let (x0, x1) = (x(1.0), x(bar.value));
        let (bx, bw) = if x1 >= x0 { (x0, x1 - x0) } else { (x1, x0 - x1) };
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{color}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{:.2}x</text>\n",
            label_w - 8.0,
            y + row_h * 0.7,
            escape(&bar.label),
            y + 3.0,
            row_h - 6.0,
            x1.max(x0) + 4.0,
            y + row_h * 0.7,
            bar.value
        );
        if let Some(t) = bar.target {
            let tx = x(t);
            s += &format!(
                "<line x1=\"{tx:.1}\" y1=\"{:.1}\" x2=\"{tx:.1}\" y2=\"{:.1}\" stroke=\"#000\" stroke-width=\"2\"/>\n",
                y + 1.0,
                y + row_h - 1.0
            );
        }
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_one_bar_per_workload_and_escapes_labels() {
        let bars = [
            Bar {
                label: "a<b".into(),
                value: 2.0,
                target: Some(1.0),
            },
            Bar {
                label: "c".into(),
                value: 0.5,
                target: None,
            },
        ];
        let svg = speedup_chart("t&t", &bars);
        assert_eq!(svg.matches("<rect x=").count(), 2);
        assert!(svg.contains("a&lt;b") && svg.contains("t&amp;t"));
        assert!(svg.contains("2.00x") && svg.contains("0.50x"));
        assert!(svg.contains("#3a9a4a") && svg.contains("#4a78c0"));
    }
}
