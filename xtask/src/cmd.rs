//! Running the commands a task is made of (its own module, so that the task
//! modules and the dispatching crate root do not import each other).

use std::process::Command;

use anyhow::{bail, Context, Result};

/// `cargo`, the one running this xtask (`$CARGO`) if known.
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
