//! Benchmark cases as JSON lines, for `cargo xtask bench record`: a bench
//! (the GPU ones, run from the bundle) calls [`record`] for each case; when
//! `DIM_BENCH_JSON` names a file, one line is appended to it, else nothing
//! happens. Fields as the history's `Case`: `name`, `unit`, `median`,
//! `spread` (interquartile range / median), `samples`, `floor`, `higher_is_better`.

use std::io::Write;

/// A JSON string literal.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// Median and relative interquartile range of timing samples.
pub fn median_spread(samples: &[f64]) -> (f64, f64) {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let x = p * (v.len() - 1) as f64;
        let (i, f) = (x.floor() as usize, x.fract());
        v[i] + f * (v[(i + 1).min(v.len() - 1)] - v[i])
    };
    let med = q(0.5);
    (
        med,
        if med != 0.0 {
            (q(0.75) - q(0.25)) / med
        } else {
            0.0
        },
    )
}

/// One case (see the module docs); panics only if the named file cannot be written.
pub fn record(
    name: &str,
    unit: &str,
    median: f64,
    spread: f64,
    samples: usize,
    floor: Option<f64>,
    higher_is_better: bool,
) {
    let Some(path) = std::env::var_os("DIM_BENCH_JSON") else {
        return;
    };
    let line = format!(
        "{{\"name\":{},\"unit\":{},\"median\":{},\"spread\":{},\"samples\":{samples},\"floor\":{},\"higher_is_better\":{higher_is_better}}}\n",
        quote(name),
        quote(unit),
        number(median),
        number(spread),
        floor.map_or("null".into(), number),
    );
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .unwrap_or_else(|e| panic!("DIM_BENCH_JSON={}: {e}", path.to_string_lossy()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_spread() {
        assert_eq!(quote("a \"b\"\\\n"), "\"a \\\"b\\\"\\\\\\u000a\"");
        let (m, s) = median_spread(&[4.0, 1.0, 2.0, 3.0, 5.0]);
        assert_eq!(m, 3.0);
        assert!((s - 2.0 / 3.0).abs() < 1e-12);
    }
}
