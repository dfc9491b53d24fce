//! Bundles for a machine with an NVIDIA GPU and PyTorch 2.11 but no Rust,
//! built in release against the venv's libtorch and stripped:
//!
//! - `cargo xtask gpu-bundle <dir>` (or `cargo xtask bench --gpu <dir>`):
//!   every test and bench target whose name starts with `gpu`, the `xtask`
//!   binary and the committed benchmark history, with a `run.sh` that runs
//!   them all, records the benchmarks as `results/gpu.json` and compares it
//!   with the last committed run for that card (non-zero exit beyond the
//!   threshold).
//! - `cargo xtask experiment-bundle <dir>`: the `dim` and `xtask` binaries,
//!   `configs/`, `xtask/experiments/` and the Fashion-MNIST files, to run
//!   `bin/xtask repro <experiment>` from `<dir>`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The bundle must stay small enough to copy around (and to carry to the device machine).
const MAX_BUNDLE_BYTES: u64 = 48 << 20;

pub fn run(root: &Path, dir: &Path, history: &Path) -> Result<()> {
    crate::setup::ensure(root)?;
    let targets = gpu_targets()?;
    if targets.is_empty() {
        bail!("no test or bench target named gpu* in the workspace");
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let mut total = 0u64;
    for kind in ["tests", "benches"] {
        fs::create_dir_all(dir.join(kind))?;
    }
    for t in &targets {
        let exe = build(t)?;
        total += copy_stripped(&exe, &dir.join(t.folder()).join(&t.name))?;
    }
    total += portable_tools(root, dir)?;
    copy_tree(history, &dir.join("history"))?;
    let run_sh = dir.join("run.sh");
    fs::write(&run_sh, RUN_SH)?;
    fs::set_permissions(&run_sh, fs::Permissions::from_mode(0o755))?;
    println!(
        "gpu-bundle: {} ({:.1} MiB); run it there with: {}/run.sh [TORCH_LIB_DIR]",
        dir.display(),
        total as f64 / 1048576.0,
        dir.display()
    );
    if total > MAX_BUNDLE_BYTES {
        bail!("the bundle is {total} bytes, over the {MAX_BUNDLE_BYTES}-byte budget");
    }
    Ok(())
}

/// `cargo xtask experiment-bundle <dir>`: `bin/dim` and
/// `data/fashion-mnist/*` (run with `DIM_FASHION_MNIST_DIR` pointing there).
pub fn experiments(root: &Path, dir: &Path) -> Result<()> {
    crate::setup::ensure(root)?;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let data = dir.join("data/fashion-mnist");
    fs::create_dir_all(dir.join("bin"))?;
    fs::create_dir_all(&data)?;
    let exe = build(&Target {
        package: "dim".into(),
        name: "dim".into(),
        kind: TargetKind::Bin,
    })?;
    let mut total = copy_stripped(&exe, &dir.join("bin/dim"))?;
    total += portable_tools(root, dir)?;
    copy_tree(&root.join("configs"), &dir.join("configs"))?;
    copy_tree(
        &root.join("xtask/experiments"),
        &dir.join("xtask/experiments"),
    )?;
    let src = Path::new(FASHION_MNIST_DIR);
    for f in fs::read_dir(src)
        .with_context(|| format!("reading {} (run cargo xtask setup)", src.display()))?
    {
        let f = f?;
        total += fs::copy(f.path(), data.join(f.file_name()))?;
    }
    println!(
        "experiment-bundle: {} ({:.1} MiB); there: cd {} && LD_LIBRARY_PATH=<torch/lib> DIM_FASHION_MNIST_DIR=$PWD/data/fashion-mnist bin/xtask repro <experiment> [--set key=value]",
        dir.display(),
        total as f64 / 1048576.0,
        dir.display(),
    );
    if total > MAX_BUNDLE_BYTES {
        bail!("the bundle is {total} bytes, over the {MAX_BUNDLE_BYTES}-byte budget");
    }
    Ok(())
}

/// `bin/xtask` (release, stripped; it needs no libtorch) and a `COMMIT`
/// file, so reports and benchmark runs made there name the commit.
fn portable_tools(root: &Path, dir: &Path) -> Result<u64> {
    fs::create_dir_all(dir.join("bin"))?;
    let exe = build(&Target {
        package: "xtask".into(),
        name: "xtask".into(),
        kind: TargetKind::Bin,
    })?;
    let size = copy_stripped(&exe, &dir.join("bin/xtask"))?;
    let _ = root;
    fs::write(dir.join("COMMIT"), crate::repro::commit() + "\n")?;
    Ok(size)
}

/// Copies the files of `src` (recursively) into `dest`.
fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest)?;
    for e in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        let to = dest.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &to)?;
        } else {
            fs::copy(e.path(), &to).with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Where Debian's dataset-fashion-mnist puts the files (installed by setup).
const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Copies an executable and strips it; returns its size.
fn copy_stripped(exe: &Path, dest: &Path) -> Result<u64> {
    fs::copy(exe, dest).with_context(|| format!("copying {}", exe.display()))?;
    crate::cmd::step(
        &format!("strip {}", dest.display()),
        Command::new("strip").arg("--strip-unneeded").arg(dest),
    )?;
    let size = fs::metadata(dest)?.len();
    println!(
        "bundle: {} ({:.1} MiB)",
        dest.display(),
        size as f64 / 1048576.0
    );
    Ok(size)
}

#[derive(PartialEq)]
enum TargetKind {
    Test,
    Bench,
    Bin,
}

struct Target {
    package: String,
    name: String,
    kind: TargetKind,
}

impl Target {
    fn folder(&self) -> &'static str {
        match self.kind {
            TargetKind::Bench => "benches",
            TargetKind::Test => "tests",
            TargetKind::Bin => "bin",
        }
    }
}

/// Test and bench targets named `gpu*`, from `cargo metadata`.
fn gpu_targets() -> Result<Vec<Target>> {
    let out = crate::cmd::cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed");
    }
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    let mut found = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        for t in pkg["targets"].as_array().into_iter().flatten() {
            let name = t["name"].as_str().unwrap_or_default();
            let kinds: Vec<&str> = t["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let bench = kinds.contains(&"bench");
            if name.starts_with("gpu") && (bench || kinds.contains(&"test")) {
                found.push(Target {
                    package: pkg["name"].as_str().unwrap_or_default().to_string(),
                    name: name.to_string(),
                    kind: if bench {
                        TargetKind::Bench
                    } else {
                        TargetKind::Test
                    },
                });
            }
        }
    }
    Ok(found)
}

/// Builds one target in release and returns its executable.
fn build(t: &Target) -> Result<PathBuf> {
    let mut cmd = crate::cmd::cargo();
    match t.kind {
        TargetKind::Bench => cmd.args(["bench", "--no-run", "--bench", &t.name]),
        TargetKind::Test => cmd.args(["test", "--release", "--no-run", "--test", &t.name]),
        // Without FFmpeg (the `video` feature): its libraries are not on
        // the GPU machine, and the image experiments do not need them.
        TargetKind::Bin => cmd.args([
            "build",
            "--release",
            "--no-default-features",
            "--bin",
            &t.name,
        ]),
    };
    cmd.args([
        "--package",
        &t.package,
        "--message-format=json-render-diagnostics",
    ])
    // A GPU bundle without kernels would be useless: fail the build instead.
    .env("DIM_REQUIRE_CUDA", "1")
    .stderr(Stdio::inherit());
    println!("gpu-bundle: building {} {}", t.package, t.name);
    let out = cmd.output().context("running cargo")?;
    if !out.status.success() {
        bail!("building {} failed", t.name);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == t.name.as_str())
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo reported no executable for {}", t.name))
}

const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs every GPU test and benchmark in this bundle and prints a summary.
# Usage: run.sh [TORCH_LIB_DIR]   (default: the lib folder of python3's torch)
set -u
here=$(cd "$(dirname "$0")" && pwd)
lib=${1:-}
if [ -z "$lib" ]; then
  lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
    echo "run.sh: cannot import torch with python3; pass the folder holding libtorch*.so" >&2
    exit 2
  }
fi
[ -e "$lib/libtorch_cpu.so" ] || { echo "run.sh: no libtorch_cpu.so in $lib" >&2; exit 2; }
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DIM_EXPECT_GPU=1
passed=0; failed=0; summary=()
for t in "$here"/tests/*; do
  [ -x "$t" ] || continue
  echo "=== test $(basename "$t")"
  # GPU tests are #[ignore]d in plain cargo test (no GPU in CI); run them here.
  if "$t" --test-threads=1 --nocapture --include-ignored; then passed=$((passed+1)); summary+=("ok    test  $(basename "$t")")
  else failed=$((failed+1)); summary+=("FAIL  test  $(basename "$t")"); fi
done
# Each bench appends its cases (JSON lines) to results/<bench>.jsonl.
mkdir -p "$here/results"
rm -f "$here"/results/*.jsonl
for b in "$here"/benches/*; do
  [ -x "$b" ] || continue
  echo "=== bench $(basename "$b")"
  if DIM_BENCH_JSON="$here/results/$(basename "$b").jsonl" "$b" --bench; then passed=$((passed+1)); summary+=("ok    bench $(basename "$b")")
  else failed=$((failed+1)); summary+=("FAIL  bench $(basename "$b")"); fi
done
# One JSON for the run, compared with the last committed run on this card.
regressed=0
jsonls=("$here"/results/*.jsonl)
if [ -e "${jsonls[0]}" ]; then
  echo "=== benchmark comparison"
  "$here/bin/xtask" bench record --suite gpu --gpu --command "gpu bundle run.sh (DIM_BENCH_SHAPES=${DIM_BENCH_SHAPES:-default})" \
    --out "$here/results/gpu.json" "${jsonls[@]}" || failed=$((failed+1))
  if [ -e "$here/results/gpu.json" ]; then
    "$here/bin/xtask" bench check-card "$here/results/gpu.json" --history "$here/history" \
      --threshold "${DIM_BENCH_THRESHOLD:-0.10}" || regressed=1
    echo "benchmark run: $here/results/gpu.json (to commit: copy it into docs/benchmarks/history/ under the name printed above)"
  fi
fi
echo "=== summary"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
printf '%s\n' "${summary[@]}"
echo "gpu bundle: $passed passed, $failed failed$([ "$regressed" -eq 1 ] && echo ', benchmark REGRESSION')"
[ "$failed" -eq 0 ] && [ "$regressed" -eq 0 ]
"#;
