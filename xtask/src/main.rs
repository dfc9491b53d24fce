//! Project automation, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! - `setup`: the project venv (PyTorch 2.11.0 and nvcc wheels), Debian packages
//!   and test data; idempotent, seconds when already done.
//! - `test`: setup if needed, then `cargo fmt --check`, clippy and the whole test suite.
//! - `demo`: setup if needed, then the main job on the embedded default data.
//! - `gpu-bundle <dir>`: the GPU tests and benchmarks, stripped, with a `run.sh`.
//! - `experiment-bundle <dir>`: the `dim` and `xtask` binaries, the configs,
//!   the experiments and Fashion-MNIST, for `bin/xtask repro` on a GPU
//!   machine without Rust.
//! - `repro <experiment>`: runs an experiment of `xtask/experiments/` and
//!   writes its report (markdown, plots, grids, metrics JSON).
//! - `bench ...`: benchmark history (JSON), comparisons, generated tables and
//!   the instruction-count guard.
//! - `modcycles`: fails if the modules of any crate depend on each other in a cycle.

mod bench;
mod bundle;
mod cmd;
mod experiment;
mod history;
mod icount;
mod modcycles;
mod plot;
mod repro;
mod setup;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "diffusion-mamba project automation")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Create the project venv (torch 2.11.0, nvcc) and install Debian packages and data.
    Setup {
        /// Check and report only; install nothing.
        #[arg(long)]
        check: bool,
    },
    /// Set up if needed, then check formatting, run clippy and the whole test suite.
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up if needed, then train a small DiM on Fashion-MNIST and sample from it.
    Demo {
        /// Extra arguments passed to `dim demo`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the GPU tests and benchmarks (release, stripped) into DIR with a run.sh.
    GpuBundle {
        /// Output folder (created; its previous contents are replaced).
        dir: PathBuf,
    },
    /// Build `dim` and `xtask` (release, stripped) into DIR/bin, with the configs,
    /// the experiments and Fashion-MNIST, to run `bin/xtask repro` there.
    ExperimentBundle {
        /// Output folder (created; its previous contents are replaced).
        dir: PathBuf,
    },
    /// Run an experiment (`xtask/experiments/<name>.toml` or a path) and write its report.
    Repro {
        /// Experiment name or file.
        experiment: String,
        /// Report folder (default runs/repro/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The `dim` binary (default: bin/dim in a bundle, else built in release here).
        #[arg(long)]
        dim: Option<PathBuf>,
        /// Override a key of the experiment file, e.g. `budget.time_limit_s=120`
        /// or `samplers.0.num=2000` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Folder for checkpoints and samples (default <out>/work).
        #[arg(long)]
        work: Option<PathBuf>,
    },
    /// Benchmarks: run and record, compare runs, generate tables, instruction-count guard.
    Bench(bench::BenchArgs),
    /// Fail if the modules of any crate (crates/*, xtask) depend on each other in a cycle.
    Modcycles,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    // From a bundle (no checkout) or a checkout's root, paths are relative
    // to where it runs; elsewhere in a checkout, to the workspace root.
    if !Path::new("xtask/experiments").is_dir() && root.is_dir() {
        std::env::set_current_dir(&root)?;
    }
    let root = std::env::current_dir()?;
    match cli.task {
        Task::Setup { check } => setup::run(&root, check),
        Task::Test { args } => test(&root, &args),
        Task::Demo { args } => demo(&root, &args),
        Task::GpuBundle { dir } => bundle::run(&root, &dir, &root.join(history::HISTORY)),
        Task::ExperimentBundle { dir } => bundle::experiments(&root, &dir),
        Task::Repro {
            experiment,
            out,
            dim,
            sets,
            work,
        } => {
            let dim = match dim {
                Some(d) => d,
                None if Path::new("bin/dim").is_file() => "bin/dim".into(),
                None => build_dim()?,
            };
            repro::run(&repro::Opts {
                experiment,
                out,
                dim,
                sets,
                work,
            })
            .map(drop)
        }
        Task::Bench(args) => bench::run(&root, args),
        Task::Modcycles => modcycles::run(&root),
    }
}

/// The workspace root (the folder above `xtask/`).
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    setup::ensure(root)?;
    cmd::step(
        "cargo fmt --check",
        cmd::cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    cmd::step(
        "cargo clippy",
        cmd::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The GPU experiment bundle builds `dim` without FFmpeg: keep that build working.
    cmd::step(
        "cargo clippy (dim without the video feature)",
        cmd::cargo().args([
            "clippy",
            "--package",
            "dim",
            "--no-default-features",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    cmd::step(
        "cargo test",
        cmd::cargo()
            .args(["test", "--workspace"])
            .arg("--")
            .args(args),
    )?;
    // Ignored tests are the GPU ones (`#[ignore = "needs CUDA: ..."]`): list
    // them, so the output says what was skipped here and runs in the GPU bundle.
    cmd::step(
        "skipped here (ignored: GPU tests, run by the GPU bundle)",
        cmd::cargo().args([
            "test",
            "--workspace",
            "--",
            "--ignored",
            "--list",
            "--format",
            "terse",
        ]),
    )?;
    println!("xtask test: all checks passed");
    Ok(())
}

fn demo(root: &Path, args: &[String]) -> Result<()> {
    setup::ensure(root)?;
    cmd::step(
        "dim demo",
        cmd::cargo()
            .args(["run", "--release", "--package", "dim", "--", "demo"])
            .args(args),
    )
}

/// Builds `dim` in release here and returns its path.
fn build_dim() -> Result<PathBuf> {
    cmd::step(
        "cargo build --release -p dim",
        cmd::cargo().args(["build", "--release", "--package", "dim"]),
    )?;
    Ok(PathBuf::from("target/release/dim"))
}
