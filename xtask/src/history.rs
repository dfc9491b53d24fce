//! Benchmark runs as data: one JSON per run under `docs/benchmarks/history/`
//! (commit, date, machine or card, each case's median, spread and floor),
//! comparisons between two runs, and the markdown tables generated from the
//! history. `bench` (the command) and `icount` (the CI guard) build on it.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::repro::{commit, cpu_model, gpus, utc_now};

/// The history folder, relative to the workspace root.
pub const HISTORY: &str = "docs/benchmarks/history";
/// The generated tables.
pub const TABLES: &str = "docs/benchmarks/history.md";

/// One benchmark run: the file format of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRun {
    /// Format version (1).
    pub schema: u32,
    /// `icount`, `cpu_scan`, `gpu`, ...
    pub suite: String,
    pub commit: String,
    /// UTC, ISO 8601.
    pub date: String,
    /// GPU name for GPU suites (the card), CPU model otherwise.
    pub machine: String,
    /// NVIDIA driver, for GPU suites.
    pub driver: Option<String>,
    /// The command that made the run.
    pub command: String,
    pub cases: Vec<Case>,
}

/// One measured case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// Unique within the run, e.g. `gpu_scan/8x2304x1024/fwd, fused bidir`.
    pub name: String,
    /// `ms`, `ns`, `Ir` (instructions), `images/s`, ...
    pub unit: String,
    pub median: f64,
    /// Relative spread of the samples: interquartile range / median (0 for
    /// instruction counts; `None` when the source did not record it).
    pub spread: Option<f64>,
    /// Number of samples behind the median, if known.
    #[serde(default)]
    pub samples: Option<u32>,
    /// The physical floor in the same unit, where known (bytes / bandwidth ...).
    #[serde(default)]
    pub floor: Option<f64>,
    /// Throughputs: a larger value is better.
    #[serde(default)]
    pub higher_is_better: bool,
}

impl BenchRun {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a benchmark run (JSON)", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    /// `<date>_<suite>_<machine>_<commit>.json`, file-name safe.
    pub fn file_name(&self) -> String {
        let slug = |s: &str| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect::<String>()
                .split('-')
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("-")
        };
        format!(
            "{}_{}_{}_{}.json",
            self.date.get(..10).unwrap_or("undated"),
            slug(&self.suite),
            slug(&self.machine),
            slug(&self.commit)
        )
    }
}

/// The environment of a run made now.
pub fn new_run(suite: &str, gpu: bool, command: &str, cases: Vec<Case>) -> BenchRun {
    let (machine, driver) = match (gpu, gpus()) {
        (true, Some(g)) => {
            // First card: "name, driver, memory".
            let first = g.lines().next().unwrap_or_default().to_string();
            let parts: Vec<&str> = first.split(',').map(str::trim).collect();
            (
                parts.first().copied().unwrap_or("unknown GPU").to_string(),
                parts.get(1).map(|d| d.to_string()),
            )
        }
        _ => (cpu_model(), None),
    };
    BenchRun {
        schema: 1,
        suite: suite.into(),
        commit: commit(),
        date: utc_now(),
        machine,
        driver,
        command: command.into(),
        cases,
    }
}

/// How one case moved from run A to run B.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub name: String,
    pub unit: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// B / A.
    pub ratio: Option<f64>,
    /// The band within which a ratio counts as noise.
    pub noise: f64,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Same,
    Slower,
    Faster,
    OnlyA,
    OnlyB,
}

/// Compares each case; a change counts when the ratio leaves
/// `1 ± max(threshold, 2 (spread_a + spread_b))`.
pub fn compare(a: &BenchRun, b: &BenchRun, threshold: f64) -> Vec<Change> {
    let mut out = Vec::new();
    for ca in &a.cases {
        let cb = b.cases.iter().find(|c| c.name == ca.name);
        let Some(cb) = cb else {
            out.push(Change {
                name: ca.name.clone(),
                unit: ca.unit.clone(),
                a: Some(ca.median),
                b: None,
                ratio: None,
                noise: 0.0,
                verdict: Verdict::OnlyA,
            });
            continue;
        };
        let noise = threshold.max(2.0 * (ca.spread.unwrap_or(0.0) + cb.spread.unwrap_or(0.0)));
        let ratio = cb.median / ca.median;
        // "Worse" is a larger time or count, a smaller throughput.
        let worse = if ca.higher_is_better {
            1.0 / ratio
        } else {
            ratio
        };
        let verdict = if worse > 1.0 + noise {
            Verdict::Slower
        } else if worse < 1.0 / (1.0 + noise) {
            Verdict::Faster
        } else {
            Verdict::Same
        };
        out.push(Change {
            name: ca.name.clone(),
            unit: ca.unit.clone(),
            a: Some(ca.median),
            b: Some(cb.median),
            ratio: Some(ratio),
            noise,
            verdict,
        });
    }
    for cb in &b.cases {
        if !a.cases.iter().any(|c| c.name == cb.name) {
            out.push(Change {
                name: cb.name.clone(),
                unit: cb.unit.clone(),
                a: None,
                b: Some(cb.median),
                ratio: None,
                noise: 0.0,
                verdict: Verdict::OnlyB,
            });
        }
    }
    out
}

fn num(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The comparison as a plain-text table.
pub fn render(a: &BenchRun, b: &BenchRun, changes: &[Change]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "A: {} {} on {} ({})\nB: {} {} on {} ({})",
        a.suite, a.commit, a.machine, a.date, b.suite, b.commit, b.machine, b.date
    );
    let w = changes
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        s,
        "{:<w$}  {:>14}  {:>14}  {:>7}  {:>6}  change",
        "case", "A", "B", "B/A", "noise"
    );
    for c in changes {
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{} {}", num(v), c.unit));
        let mark = match c.verdict {
            Verdict::Same => "",
            Verdict::Slower => "REGRESSION",
            Verdict::Faster => "improved",
            Verdict::OnlyA => "only in A",
            Verdict::OnlyB => "only in B",
        };
        let _ = writeln!(
            s,
            "{:<w$}  {:>14}  {:>14}  {:>7}  {:>5.1}%  {mark}",
            c.name,
            f(c.a),
            f(c.b),
            c.ratio.map_or("-".into(), |r| format!("{r:.3}")),
            100.0 * c.noise
        );
    }
    s
}

/// The history's runs, oldest first (by date, then file name).
pub fn history(dir: &Path) -> Result<Vec<(PathBuf, BenchRun)>> {
    let mut runs = Vec::new();
    if !dir.is_dir() {
        return Ok(runs);
    }
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") {
            runs.push((p.clone(), BenchRun::read(&p)?));
        }
    }
    runs.sort_by(|(pa, a), (pb, b)| a.date.cmp(&b.date).then(pa.cmp(pb)));
    Ok(runs)
}

/// `bench check-card`: compares `run` with the newest run in `dir` of the
/// same suite and machine; `Ok(false)` on a regression.
pub fn check_against_history(run: &BenchRun, dir: &Path, threshold: f64) -> Result<bool> {
    let last = history(dir)?
        .into_iter()
        .rfind(|(_, r)| r.suite == run.suite && r.machine == run.machine && r != run);
    let Some((path, last)) = last else {
        println!(
            "bench: no committed `{}` run on {} in {}: nothing to compare (commit this run as the first)",
            run.suite,
            run.machine,
            dir.display()
        );
        return Ok(true);
    };
    println!("bench: against {}", path.display());
    let changes = compare(&last, run, threshold);
    print!("{}", render(&last, run, &changes));
    let bad: Vec<&Change> = changes
        .iter()
        .filter(|c| c.verdict == Verdict::Slower)
        .collect();
    for c in &bad {
        println!(
            "bench: REGRESSION {}: ratio {:.3} (beyond {:.1}%)",
            c.name,
            c.ratio.unwrap_or(f64::NAN),
            100.0 * c.noise
        );
    }
    Ok(bad.is_empty())
}

/// The markdown of `docs/benchmarks/history.md`: per suite and machine, the
/// newest run's cases with the ratio to the run before it.
pub fn tables(runs: &[(PathBuf, BenchRun)]) -> String {
    let mut md = String::from(
        "# Benchmark history (generated)\n\n\
         Generated by `cargo xtask bench tables` from the JSON runs in\n\
         [`history/`](history/); do not edit by hand. Per suite and machine: the\n\
         newest run, with each case's ratio to the run before it (`compare`:\n\
         `cargo xtask bench compare A.json B.json`). Spread = interquartile range / median.\n",
    );
    let mut keys: Vec<(String, String)> = runs
        .iter()
        .map(|(_, r)| (r.suite.clone(), r.machine.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    for (suite, machine) in keys {
        let same: Vec<&(PathBuf, BenchRun)> = runs
            .iter()
            .filter(|(_, r)| r.suite == suite && r.machine == machine)
            .collect();
        let (path, last) = same[same.len() - 1];
        let prev = (same.len() > 1).then(|| &same[same.len() - 2].1);
        let _ = writeln!(
            md,
            "\n## `{suite}` on {machine}\n\n{} run(s); newest: commit {}, {}{}, file [`{}`](history/{}).\nCommand: `{}`\n",
            same.len(),
            last.commit,
            last.date,
            last.driver.as_ref().map_or(String::new(), |d| format!(", driver {d}")),
            path.file_name().unwrap_or_default().to_string_lossy(),
            path.file_name().unwrap_or_default().to_string_lossy(),
            last.command
        );
        let _ = writeln!(
            md,
            "| case | median | spread | floor | × floor | vs previous{} |\n|---|---|---|---|---|---|",
            prev.map_or(String::new(), |p| format!(" ({})", p.commit))
        );
        for c in &last.cases {
            let vs = prev
                .and_then(|p| p.cases.iter().find(|x| x.name == c.name))
                .map_or("–".into(), |p| format!("{:.3}", c.median / p.median));
            let _ = writeln!(
                md,
                "| {} | {} {} | {} | {} | {} | {vs} |",
                c.name.replace('|', "/"),
                num(c.median),
                c.unit,
                c.spread
                    .map_or("–".into(), |s| format!("{:.1}%", 100.0 * s)),
                c.floor.map_or("–".into(), num),
                c.floor
                    .filter(|f| *f > 0.0)
                    .map_or("–".into(), |f| format!("{:.2}", c.median / f)),
            );
        }
    }
    md
}

/// Parses the table a `gpu_scan` run prints (logs from before the JSON
/// history): `B x D x L | case | ms MB Gexp | floor x-floor | ...`.
pub fn parse_gpu_scan_log(text: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        if cols.len() < 4 || !cols[0].contains('x') || cols[0].contains(' ') {
            continue;
        }
        let nums = |s: &str| -> Vec<f64> {
            s.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        };
        let (m, f) = (nums(cols[2]), nums(cols[3]));
        let (Some(&ms), Some(&floor)) = (m.first(), f.first()) else {
            continue;
        };
        cases.push(Case {
            name: format!("gpu_scan/{}/{}", cols[0], cols[1]),
            unit: "ms".into(),
            median: ms,
            spread: None,
            samples: Some(9),
            floor: Some(floor),
            higher_is_better: false,
        });
    }
    cases
}
