//! Result presentation: latency summaries from HdrHistograms (recorded in microseconds,
//! reported in milliseconds), plain-text tables for the terminal, the once-a-second progress
//! line, and the markdown row appended for `benches/run.sh`.

use std::io::Write;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest value a latency histogram holds: 60 s in microseconds (larger values are clamped).
pub const MAX_US: u64 = 60_000_000;

/// A histogram of microseconds with 2 significant figures (about 20 KB each).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 2).expect("constant bounds are valid")
}

/// Records `us` microseconds, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    let _ = h.record(us.clamp(1, MAX_US));
}

/// A latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: (h.mean() / 10.0).round() / 100.0,
        }
    }
}

/// A two-column (or wider) text table printed to stdout.
pub struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, header: &[&str]) -> Self {
        Self { title: title.into(), header: header.iter().map(|s| (*s).to_owned()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// A name/value row.
    pub fn kv(&mut self, name: &str, value: impl std::fmt::Display) {
        self.rows.push(vec![name.to_owned(), value.to_string()]);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len().max(self.rows.iter().map(Vec::len).max().unwrap_or(0));
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let cells: Vec<String> = (0..cols)
                .map(|i| {
                    let c = r.get(i).map(String::as_str).unwrap_or("");
                    format!("{c:<w$}", w = width[i])
                })
                .collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let sep = format!("|{}|\n", width.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
        let mut out = format!("\n{}\n", self.title);
        out.push_str(&line(&self.header));
        out.push_str(&sep);
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// Prints a progress line to stderr (stdout stays clean for `--json`).
pub fn progress(line: &str) {
    eprintln!("{line}");
}

/// Appends one `| scenario | parameters | result |` row to a markdown file.
pub fn append_markdown(path: &Path, scenario: &str, params: &str, result: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let esc = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    writeln!(f, "| {} | {} | {} |", esc(scenario), esc(params), esc(result))
}

/// Formats an optional count, or "n/a".
pub fn opt_u64(v: Option<u64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "n/a".to_owned())
}

/// Formats an optional figure with `digits` decimals, or "n/a".
pub fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "n/a".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_in_milliseconds() {
        let mut h = histogram();
        for us in 1..=1000 {
            record(&mut h, us * 10);
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 5.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 10.0).abs() < 0.1, "{l:?}");
    }

    #[test]
    fn renders_a_table() {
        let mut t = Table::new("t", &["a", "b"]);
        t.kv("x", 1);
        assert!(t.render().contains("| x | 1 |"));
    }
}
