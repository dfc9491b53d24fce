//! Project automation, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! - `setup`: the project venv (PyTorch 2.11.0 and nvcc wheels), Debian packages
//!   and test data; idempotent, seconds when already done.
//! - `test`: setup if needed, then `cargo fmt --check`, clippy and the whole test suite.
//! - `demo`: setup if needed, then the main job on the embedded default data.
//! - `gpu-bundle <dir>`: the GPU tests and benchmarks, stripped, with a `run.sh`.
//! - `experiment-bundle <dir>`: the `dim` binary and Fashion-MNIST, for the
//!   reproducible runs of `xtask/experiments/` on a GPU machine without Rust.

mod bundle;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
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
    /// Build the `dim` binary (release, stripped) into DIR/bin with Fashion-MNIST in DIR/data.
    ExperimentBundle {
        /// Output folder (created; its previous contents are replaced).
        dir: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup { check } => setup::run(&root, check),
        Task::Test { args } => test(&root, &args),
        Task::Demo { args } => demo(&root, &args),
        Task::GpuBundle { dir } => bundle::run(&root, &dir),
        Task::ExperimentBundle { dir } => bundle::experiments(&root, &dir),
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
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The GPU experiment bundle builds `dim` without FFmpeg: keep that build working.
    step(
        "cargo clippy (dim without the video feature)",
        cargo().args([
            "clippy",
            "--package",
            "dim",
            "--no-default-features",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "cargo test",
        cargo().args(["test", "--workspace"]).arg("--").args(args),
    )?;
    // Ignored tests are the GPU ones (`#[ignore = "needs CUDA: ..."]`): list
    // them, so the output says what was skipped here and runs in the GPU bundle.
    step(
        "skipped here (ignored: GPU tests, run by the GPU bundle)",
        cargo().args([
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
    step(
        "dim demo",
        cargo()
            .args(["run", "--release", "--package", "dim", "--", "demo"])
            .args(args),
    )
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Runs a command, echoing it, and fails with its name when it fails.
pub(crate) fn step(name: &str, cmd: &mut Command) -> Result<()> {
    println!("xtask: {name}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}
