//! `cargo xtask repro` end to end on a CPU: the tiny two-arm experiment
//! (`xtask/experiments/tiny_cpu.toml`) through the real `dim` binary, then
//! the report folder is checked: markdown, plots, grids, metrics JSON, and
//! every plotted number against the logged metrics, recomputed here from
//! the `metrics.jsonl` files `dim train` wrote and the `dim eval` reports.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `dim` binary of this build (a sibling of xtask's; `cargo test
/// --workspace` builds it).
fn dim_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_xtask")).with_file_name("dim");
    assert!(
        p.is_file(),
        "{} is missing: build it first (`cargo build -p dim`, or run the workspace's tests)",
        p.display()
    );
    p
}

fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// A chart's series as (name, points).
fn series(chart: &Value) -> Vec<(String, Vec<(f64, f64)>)> {
    chart["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let pts = s["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
                .collect();
            (s["name"].as_str().unwrap().to_string(), pts)
        })
        .collect()
}

fn is_png(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.len() > 100 && &b[1..4] == b"PNG")
}

#[test]
fn tiny_cpu_experiment_report_matches_the_logged_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("report");
    let status = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(root())
        .args(["repro", "tiny_cpu", "--out"])
        .arg(&out)
        .arg("--dim")
        .arg(dim_binary())
        // An override from the command line reaches the runs.
        .args(["--set", "budget.steps=4"])
        .status()
        .unwrap();
    assert!(status.success(), "repro failed: {status}");

    // The files.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "## Environment",
        "| commit |",
        "## Results",
        "| dim | cpu | 16 | 4 |",
        "| dit | cpu | 16 | 4 |",
        "cargo xtask repro tiny_cpu --set 'budget.steps=4'",
        "plots/loss_vs_step.png",
    ] {
        assert!(md.contains(needle), "report.md lacks `{needle}`:\n{md}");
    }
    let plots = [
        "loss_vs_step",
        "loss_vs_time",
        "fid_vs_step",
        "throughput_vs_tokens",
        "memory_vs_tokens",
    ];
    for p in plots {
        assert!(is_png(&out.join(format!("plots/{p}.png"))), "plot {p}");
        assert!(
            out.join(format!("plots/{p}.json")).is_file(),
            "plot data {p}"
        );
    }
    for g in ["dim_ddim3.png", "dit_ddim3.png", "dim_ddim3_cfg2.png"] {
        assert!(is_png(&out.join("grids").join(g)), "grid {g}");
    }
    let metrics = json(&out.join("metrics.json"));
    assert_eq!(metrics["runs"].as_array().unwrap().len(), 2);

    // Plotted numbers against what `dim train` logged (its own file, in work/).
    let logged = |run: &str| jsonl(&out.join("work").join(run).join("metrics.jsonl"));
    let pick = |lines: &[Value], x: &str, y: &str| -> Vec<(f64, f64)> {
        lines
            .iter()
            .map(|l| (l[x].as_f64().unwrap(), l[y].as_f64().unwrap()))
            .collect()
    };
    for (chart, x) in [("loss_vs_step", "step"), ("loss_vs_time", "elapsed_s")] {
        let s = series(&json(&out.join(format!("plots/{chart}.json"))));
        assert_eq!(s.len(), 2, "{chart}");
        for (name, pts) in s {
            let want = pick(&logged(&name), x, "loss");
            assert_eq!(want.len(), 4, "{name}: 4 logged steps");
            assert_eq!(pts, want, "{chart} {name}");
        }
    }
    // Throughput: the median images/s of the lines after the first; memory: the peak.
    let thr = series(&json(&out.join("plots/throughput_vs_tokens.json")));
    let mem = series(&json(&out.join("plots/memory_vs_tokens.json")));
    for run in ["dim", "dit"] {
        let lines = logged(run);
        let mut v: Vec<f64> = lines[1..]
            .iter()
            .map(|l| l["images_per_s"].as_f64().unwrap())
            .collect();
        v.sort_by(f64::total_cmp);
        let peak = lines
            .iter()
            .map(|l| l["memory_mib"].as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let find =
            |s: &[(String, Vec<(f64, f64)>)]| s.iter().find(|x| x.0 == run).unwrap().1.clone();
        assert_eq!(find(&thr), vec![(16.0, v[v.len() / 2])], "throughput {run}");
        assert_eq!(find(&mem), vec![(16.0, peak)], "memory {run}");
    }
    // FID against step: one point per kept checkpoint (steps 2 and 4), each
    // the FID of the `dim eval` report written for it.
    let fid = series(&json(&out.join("plots/fid_vs_step.json")));
    assert_eq!(fid.len(), 2);
    for (name, pts) in fid {
        let run = name.split(' ').next().unwrap();
        let want: Vec<(f64, f64)> = [2, 4]
            .iter()
            .map(|&s| {
                let r = json(&out.join(format!("work/{run}_curve_{s}.eval.json")));
                assert_eq!(r["num_generated"].as_u64(), Some(8));
                (s as f64, r["fid"].as_f64().unwrap())
            })
            .collect();
        assert_eq!(pts, want, "fid {name}");
    }
    // The results table's FID is the final evaluation's.
    let r = json(&out.join("work/dim_ddim3.eval.json"));
    assert!(
        md.contains(&format!("| {:.3} |", r["fid"].as_f64().unwrap())),
        "{md}"
    );
}
