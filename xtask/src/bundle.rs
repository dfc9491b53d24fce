//! `cargo xtask gpu-bundle <dir>`.
use std::path::Path;

use anyhow::Result;

pub fn run(_root: &Path, _dir: &Path) -> Result<()> {
    anyhow::bail!("gpu-bundle: not written yet")
}
