//! The instruction-count guard: every bench target named `icount_*` (see
//! `dim_build::icount`), each case run once under valgrind's callgrind,
//! counting only the instructions inside `dim_icount_measured`, compared
//! with the committed baseline `docs/benchmarks/icount_baseline.json`.
//!
//! The targets are built in the dev profile (workspace crates at opt-level
//! 1, dependencies at 2): the build CI has already made for the tests, so
//! the guard costs only the valgrind runs. Counts depend on the compiler and
//! the CPU's instruction set (valgrind reports AVX2, never AVX-512), so the
//! baseline is made on the CI machine type and updated with
//! `cargo xtask bench baseline --update` when a change moves it on purpose.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::history::{compare, new_run, render, BenchRun, Case, Verdict};

/// The committed baseline, relative to the workspace root.
pub const BASELINE: &str = "docs/benchmarks/icount_baseline.json";
/// CI fails when a case executes this much more (relative) than its baseline.
pub const THRESHOLD: f64 = 0.05;

/// A built `icount_*` bench executable.
struct Target {
    name: String,
    exe: PathBuf,
}

/// Bench targets named `icount_*`, built (dev profile) in one cargo call
/// over the whole workspace, so features unify as in `cargo test --workspace`
/// and the dependencies CI built for the tests are reused.
fn targets() -> Result<Vec<Target>> {
    println!("icount: building the icount_* benches");
    let out = crate::cmd::cargo()
        .args([
            "build",
            "--workspace",
            "--bench",
            "icount_*",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("building the icount_* benches failed");
    }
    let mut found: Vec<Target> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?;
            let exe = m["executable"].as_str()?;
            name.starts_with("icount_").then(|| Target {
                name: name.to_string(),
                exe: PathBuf::from(exe),
            })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    if found.is_empty() {
        bail!("no bench target named icount_* in the workspace");
    }
    Ok(found)
}

/// The `totals:` (or `summary:`) line of a callgrind output file: Ir.
pub fn parse_callgrind_total(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("totals:"))
        .or_else(|| text.lines().find(|l| l.starts_with("summary:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Instructions executed by one case.
fn count(t: &Target, case: &str, tmp: &Path) -> Result<u64> {
    let out_file = tmp.join(format!("{}.{case}.callgrind", t.name));
    let out = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--collect-atstart=no",
            "--toggle-collect=dim_icount_measured",
            "--dump-line=no",
            "--compress-strings=no",
        ])
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(&t.exe)
        .args(["--case", case])
        // One thread everywhere: the count is of one thread's work.
        .env("RAYON_NUM_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .output()
        .context("running valgrind (installed by `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "{} --case {case} under callgrind failed ({}):\n{}",
            t.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&out_file)
        .with_context(|| format!("reading {}", out_file.display()))?;
    match parse_callgrind_total(&text) {
        Some(0) | None => bail!(
            "{}: no instructions counted for {case} (is dim_icount_measured in the binary?)",
            out_file.display()
        ),
        Some(n) => Ok(n),
    }
}

/// Builds the targets and counts every case (two valgrind processes at a time).
pub fn measure(root: &Path, only: Option<&str>) -> Result<BenchRun> {
    // No `setup::ensure` here: CI's test step has just run it, and it
    // relinks `.dim/`, which would rebuild torch-sys.
    let targets = targets()?;
    let mut jobs = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let out = Command::new(&t.exe)
            .arg("--list")
            .output()
            .with_context(|| format!("running {} --list", t.exe.display()))?;
        for case in String::from_utf8_lossy(&out.stdout).lines() {
            if only.is_none_or(|o| case.contains(o)) {
                jobs.push((i, case.trim().to_string()));
            }
        }
    }
    let tmp = root.join("target/icount");
    std::fs::create_dir_all(&tmp)?;
    let queue = Mutex::new(jobs.clone());
    let results = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(2);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let Some((i, case)) = queue.lock().unwrap().pop() else {
                    break;
                };
                let t = &targets[i];
                let r = count(t, &case, &tmp);
                if let Ok(n) = &r {
                    println!("icount: {:<32} {n:>14} Ir", case);
                }
                results.lock().unwrap().push((case, r));
            });
        }
    });
    let mut cases = Vec::new();
    for (case, r) in results.into_inner().unwrap() {
        cases.push(Case {
            name: case,
            unit: "Ir".into(),
            median: r? as f64,
            spread: Some(0.0),
            samples: Some(1),
            floor: None,
            higher_is_better: false,
        });
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    let valgrind = Command::new("valgrind")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(new_run(
        "icount",
        false,
        &format!("cargo xtask bench icount ({valgrind}, callgrind Ir, dev profile)"),
        cases,
    ))
}

/// CI's guard: counts, compares with the baseline, fails beyond `threshold`.
/// `only`: the cases whose names contain it (a quicker local check).
pub fn guard(root: &Path, threshold: f64, only: Option<&str>) -> Result<()> {
    let base_path = root.join(BASELINE);
    let mut base = BenchRun::read(&base_path).with_context(|| {
        "no instruction-count baseline: make one with `cargo xtask bench baseline --update`"
    })?;
    if let Some(o) = only {
        base.cases.retain(|c| c.name.contains(o));
    }
    let now = measure(root, only)?;
    let changes = compare(&base, &now, threshold);
    print!("{}", render(&base, &now, &changes));
    let mut failures = Vec::new();
    for c in &changes {
        match c.verdict {
            Verdict::Slower => failures.push(format!(
                "{}: {:.0} -> {:.0} Ir, ratio {:.3} (threshold {:.0}%)",
                c.name,
                c.a.unwrap_or(0.0),
                c.b.unwrap_or(0.0),
                c.ratio.unwrap_or(f64::NAN),
                100.0 * threshold
            )),
            Verdict::OnlyB => failures.push(format!(
                "{}: a new case without a baseline",
                c.name
            )),
            Verdict::OnlyA => failures.push(format!(
                "{}: in the baseline but no longer measured",
                c.name
            )),
            Verdict::Faster => println!(
                "icount: {} is faster than its baseline (ratio {:.3}): update the baseline to keep the gain",
                c.name,
                c.ratio.unwrap_or(f64::NAN)
            ),
            Verdict::Same => {}
        }
    }
    if failures.is_empty() {
        println!(
            "icount guard: {} cases within {:.0}% of {BASELINE}",
            now.cases.len(),
            100.0 * threshold
        );
        Ok(())
    } else {
        for f in &failures {
            println!("icount guard: FAIL {f}");
        }
        bail!(
            "instruction-count guard failed ({} case(s)); if the change is intended, run `cargo xtask bench baseline --update` and commit the baseline",
            failures.len()
        )
    }
}

/// `bench baseline --update`: measures and rewrites the baseline.
pub fn update_baseline(root: &Path) -> Result<()> {
    let path = root.join(BASELINE);
    let old = BenchRun::read(&path).ok();
    let now = measure(root, None)?;
    if let Some(old) = &old {
        print!("{}", render(old, &now, &compare(old, &now, THRESHOLD)));
    }
    now.write(&path)?;
    println!(
        "icount: wrote {} ({} cases); commit it (`git diff {BASELINE}` shows the change)",
        path.display(),
        now.cases.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callgrind_totals_are_read() {
        let text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfn=(1) x\n3 4\nsummary: 1234\n\n\ntotals: 5678\n";
        assert_eq!(parse_callgrind_total(text), Some(5678));
        assert_eq!(parse_callgrind_total("summary: 42\n"), Some(42));
        assert_eq!(parse_callgrind_total("events: Ir\n"), None);
    }
}
