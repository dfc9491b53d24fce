//! `cargo xtask bench`: benchmark runs as JSON under `docs/benchmarks/history/`,
//! comparisons between runs, the markdown tables generated from them, and
//! the instruction-count guard.
//!
//! - `bench` (no subcommand): the CPU suites here: the instruction counts and
//!   the `cpu_scan` criterion bench, one JSON each in the history.
//! - `bench --gpu [DIR]`: builds the GPU bundle; its `run.sh` writes
//!   `results/gpu.json` there (copy it into the history) and compares it with
//!   the last committed run for that card.
//! - `bench compare A B`: each case's ratio B/A, marked where it moves beyond
//!   the noise; `--fail` exits non-zero on a regression.
//! - `bench check-card RUN`: `compare` against the newest committed run of
//!   the same suite on the same machine (what `run.sh` calls).
//! - `bench tables [--check]`: writes (or checks) `docs/benchmarks/history.md`.
//! - `bench icount`: the CI guard; `bench baseline --update` rewrites its baseline.
//! - `bench record` / `bench import-gpu-scan`: case lines (as the GPU benches
//!   write them under `DIM_BENCH_JSON`) or an old `gpu_scan` log to a run JSON.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use dim_build::bench_json::median_spread;

use crate::history::*;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: Option<BenchCmd>,
    /// Build the GPU bundle (into this folder, default `bundle/`) instead of running here.
    #[arg(long, num_args = 0..=1, default_missing_value = "bundle")]
    gpu: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Print each case's ratio B/A and mark the changes beyond the noise.
    Compare {
        a: PathBuf,
        b: PathBuf,
        /// Smallest relative change that counts (besides twice the summed spreads).
        #[arg(long, default_value_t = 0.05)]
        threshold: f64,
        /// Exit non-zero on a regression.
        #[arg(long)]
        fail: bool,
    },
    /// Compare a run with the newest committed run of its suite on its machine.
    CheckCard {
        run: PathBuf,
        #[arg(long, default_value = HISTORY)]
        history: PathBuf,
        #[arg(long, default_value_t = 0.10)]
        threshold: f64,
    },
    /// Write docs/benchmarks/history.md from the history (or check it is current).
    Tables {
        #[arg(long)]
        check: bool,
    },
    /// The instruction-count guard: fails beyond the threshold against the committed baseline.
    Icount {
        #[arg(long, default_value_t = crate::icount::THRESHOLD)]
        threshold: f64,
        /// Only the cases whose names contain this (a quicker local check).
        #[arg(long)]
        only: Option<String>,
    },
    /// Rewrite the instruction-count baseline (`--update`), to commit with a change that moves it.
    Baseline {
        #[arg(long)]
        update: bool,
    },
    /// Make a run JSON from case lines (JSON, one per line, as the GPU benches write with DIM_BENCH_JSON).
    Record {
        #[arg(long)]
        suite: String,
        /// A GPU suite: the machine is the card.
        #[arg(long)]
        gpu: bool,
        #[arg(long)]
        command: String,
        #[arg(long)]
        out: PathBuf,
        cases: Vec<PathBuf>,
    },
    /// Make a run JSON from a `gpu_scan` log printed before the JSON history.
    ImportGpuScan {
        log: PathBuf,
        #[arg(long)]
        machine: String,
        #[arg(long)]
        driver: Option<String>,
        #[arg(long)]
        date: String,
        #[arg(long)]
        commit: String,
        #[arg(long)]
        command: String,
    },
}

pub fn run(root: &Path, args: BenchArgs) -> Result<()> {
    let hist = root.join(HISTORY);
    match (args.cmd, args.gpu) {
        (None, Some(dir)) => {
            crate::bundle::run(root, &dir, &root.join(HISTORY))?;
            println!(
                "bench --gpu: copy {0} to the GPU machine and run `{0}/run.sh`; it writes {0}/results/gpu.json and compares it with the last committed run for that card. Copy that file here as {HISTORY}/<its file name> and run `cargo xtask bench tables`.",
                dir.display()
            );
            Ok(())
        }
        (None, None) => {
            let icount = crate::icount::measure(root, None)?;
            let p = hist.join(icount.file_name());
            icount.write(&p)?;
            println!("bench: wrote {}", p.display());
            let cpu = cpu_scan(root)?;
            let p = hist.join(cpu.file_name());
            cpu.write(&p)?;
            println!("bench: wrote {}", p.display());
            fs::write(root.join(TABLES), tables(&history(&hist)?))?;
            println!("bench: regenerated {TABLES}");
            Ok(())
        }
        (Some(cmd), _) => match cmd {
            BenchCmd::Compare {
                a,
                b,
                threshold,
                fail,
            } => {
                let (ra, rb) = (BenchRun::read(&a)?, BenchRun::read(&b)?);
                let changes = compare(&ra, &rb, threshold);
                print!("{}", render(&ra, &rb, &changes));
                let n = changes
                    .iter()
                    .filter(|c| c.verdict == Verdict::Slower)
                    .count();
                if fail && n > 0 {
                    bail!("{n} case(s) regressed beyond the noise");
                }
                Ok(())
            }
            BenchCmd::CheckCard {
                run,
                history,
                threshold,
            } => {
                if check_against_history(&BenchRun::read(&run)?, &history, threshold)? {
                    Ok(())
                } else {
                    bail!("GPU benchmark regression beyond the threshold (see above)")
                }
            }
            BenchCmd::Tables { check } => {
                let md = tables(&history(&hist)?);
                let path = root.join(TABLES);
                if check {
                    let old = fs::read_to_string(&path).unwrap_or_default();
                    if old != md {
                        bail!("{TABLES} is not generated from {HISTORY}: run `cargo xtask bench tables`");
                    }
                    println!("bench: {TABLES} is current");
                } else {
                    fs::write(&path, md)?;
                    println!("bench: wrote {TABLES}");
                }
                Ok(())
            }
            BenchCmd::Icount { threshold, only } => {
                crate::icount::guard(root, threshold, only.as_deref())
            }
            BenchCmd::Baseline { update } => {
                if !update {
                    bail!("`bench baseline` rewrites the committed baseline: pass --update");
                }
                crate::icount::update_baseline(root)
            }
            BenchCmd::Record {
                suite,
                gpu,
                command,
                out,
                cases,
            } => {
                let mut all = Vec::new();
                for p in &cases {
                    for (i, line) in fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?
                        .lines()
                        .enumerate()
                        .filter(|(_, l)| !l.trim().is_empty())
                    {
                        all.push(serde_json::from_str::<Case>(line).with_context(|| {
                            format!("{} line {}: not a case", p.display(), i + 1)
                        })?);
                    }
                }
                if all.is_empty() {
                    bail!("no cases in {cases:?}");
                }
                let run = new_run(&suite, gpu, &command, all);
                run.write(&out)?;
                println!(
                    "bench: wrote {} ({} cases); history name: {}",
                    out.display(),
                    run.cases.len(),
                    run.file_name()
                );
                Ok(())
            }
            BenchCmd::ImportGpuScan {
                log,
                machine,
                driver,
                date,
                commit,
                command,
            } => {
                let text = fs::read_to_string(&log)
                    .with_context(|| format!("reading {}", log.display()))?;
                let cases = parse_gpu_scan_log(&text);
                if cases.is_empty() {
                    bail!("{}: no gpu_scan table rows", log.display());
                }
                let run = BenchRun {
                    schema: 1,
                    suite: "gpu".into(),
                    commit,
                    date,
                    machine,
                    driver,
                    command,
                    cases,
                };
                let p = hist.join(run.file_name());
                run.write(&p)?;
                println!("bench: wrote {} ({} cases)", p.display(), run.cases.len());
                Ok(())
            }
        },
    }
}

/// Runs the `cpu_scan` criterion bench and reads criterion's estimates.
fn cpu_scan(root: &Path) -> Result<BenchRun> {
    crate::cmd::step(
        "cargo bench -p dim-scan --bench cpu_scan",
        crate::cmd::cargo()
            .args(["bench", "-p", "dim-scan", "--bench", "cpu_scan"])
            .env("DIM_BENCH_CPU_TIME", "1"),
    )?;
    let dir = root.join("target/criterion/scan_cpu");
    let mut cases = Vec::new();
    for func in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let func = func?.path();
        if !func.is_dir() || func.ends_with("report") {
            continue;
        }
        for id in fs::read_dir(&func)? {
            let new = id?.path().join("new");
            let Ok(sample) = fs::read_to_string(new.join("sample.json")) else {
                continue;
            };
            let s: serde_json::Value = serde_json::from_str(&sample)?;
            let per_iter: Vec<f64> = s["iters"]
                .as_array()
                .into_iter()
                .flatten()
                .zip(s["times"].as_array().into_iter().flatten())
                .filter_map(|(i, t)| Some(t.as_f64()? / i.as_f64()? / 1e6))
                .collect();
            if per_iter.is_empty() {
                continue;
            }
            let (median, spread) = median_spread(&per_iter);
            let name = new
                .parent()
                .and_then(|p| p.strip_prefix(root.join("target/criterion")).ok())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            cases.push(Case {
                name,
                unit: "ms".into(),
                median,
                spread: Some(spread),
                samples: Some(per_iter.len() as u32),
                floor: None,
                higher_is_better: false,
            });
        }
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(new_run(
        "cpu_scan",
        false,
        "DIM_BENCH_CPU_TIME=1 cargo bench -p dim-scan --bench cpu_scan (CPU time per iteration)",
        cases,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, median: f64, spread: Option<f64>) -> Case {
        Case {
            name: name.into(),
            unit: "ms".into(),
            median,
            spread,
            samples: None,
            floor: Some(1.0),
            higher_is_better: false,
        }
    }

    fn run(cases: Vec<Case>) -> BenchRun {
        BenchRun {
            schema: 1,
            suite: "gpu".into(),
            commit: "abc".into(),
            date: "2026-11-29T00:00:00Z".into(),
            machine: "NVIDIA H200".into(),
            driver: None,
            command: "x".into(),
            cases,
        }
    }

    #[test]
    fn compare_marks_changes_beyond_noise_only() {
        let a = run(vec![
            case("same", 1.0, Some(0.01)),
            case("slow", 1.0, Some(0.01)),
            case("fast", 1.0, None),
            case("noisy", 1.0, Some(0.2)),
            case("gone", 1.0, None),
        ]);
        let b = run(vec![
            case("same", 1.04, Some(0.01)),
            case("slow", 1.30, Some(0.01)),
            case("fast", 0.5, None),
            case("noisy", 1.5, Some(0.2)),
            case("new", 1.0, None),
        ]);
        let ch = compare(&a, &b, 0.05);
        let v = |n: &str| ch.iter().find(|c| c.name == n).unwrap().verdict;
        assert_eq!(v("same"), Verdict::Same);
        assert_eq!(v("slow"), Verdict::Slower);
        assert_eq!(v("fast"), Verdict::Faster);
        // 2 * (0.2 + 0.2) = 0.8 > 0.5: noise.
        assert_eq!(v("noisy"), Verdict::Same);
        assert_eq!(v("gone"), Verdict::OnlyA);
        assert_eq!(v("new"), Verdict::OnlyB);
        let slow = ch.iter().find(|c| c.name == "slow").unwrap();
        assert!((slow.ratio.unwrap() - 1.3).abs() < 1e-12);
        let text = render(&a, &b, &ch);
        assert!(
            text.contains("REGRESSION") && text.contains("1.300"),
            "{text}"
        );
    }

    #[test]
    fn throughput_regresses_downwards() {
        let mut a = run(vec![case("thr", 100.0, None)]);
        a.cases[0].higher_is_better = true;
        let mut b = a.clone();
        b.cases[0].median = 80.0;
        assert_eq!(compare(&a, &b, 0.05)[0].verdict, Verdict::Slower);
    }

    #[test]
    fn gpu_scan_logs_parse_to_cases() {
        let log = "gpu_scan: copy bandwidth 4.13 TB/s\n       B x D x L |                 case |        ms        MB      Gexp |   floor x floor |  Mamba-1  ratio | target\n     8x2304x1024 |     fwd, 1 direction |     0.331     151.5      0.34 |   0.081    4.07 |     0.33   1.01 | -\n";
        let c = parse_gpu_scan_log(log);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, "gpu_scan/8x2304x1024/fwd, 1 direction");
        assert_eq!((c[0].median, c[0].floor), (0.331, Some(0.081)));
    }

    #[test]
    fn history_check_and_tables() {
        let dir = tempfile::tempdir().unwrap();
        let old = run(vec![case("k", 1.0, Some(0.0))]);
        old.write(&dir.path().join(old.file_name())).unwrap();
        let mut new = old.clone();
        new.commit = "def".into();
        new.date = "2026-11-30T00:00:00Z".into();
        new.cases[0].median = 1.02;
        assert!(check_against_history(&new, dir.path(), 0.10).unwrap());
        new.cases[0].median = 1.5;
        assert!(!check_against_history(&new, dir.path(), 0.10).unwrap());
        // Another card has no history: passes with a note.
        new.machine = "NVIDIA A100".into();
        assert!(check_against_history(&new, dir.path(), 0.10).unwrap());
        new.write(&dir.path().join(new.file_name())).unwrap();
        let md = tables(&history(dir.path()).unwrap());
        assert!(
            md.contains("## `gpu` on NVIDIA H200") && md.contains("| k | 1.000 ms"),
            "{md}"
        );
        assert!(md.contains("## `gpu` on NVIDIA A100"), "{md}");
    }
}
