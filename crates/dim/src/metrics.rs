//! Metrics as JSON lines (one object per logged step), flushed as written
//! so that a crash loses nothing already logged.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Appends JSON objects to a `.jsonl` file.
#[derive(Debug)]
pub struct JsonlWriter {
    out: BufWriter<File>,
}

impl JsonlWriter {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn open(path: &Path) -> Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        Ok(Self {
            out: BufWriter::new(f),
        })
    }

    /// Writes one record as a line.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }
}

/// One training log record.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub images_per_s: f64,
    /// Resident memory of the process (CPU), or on CUDA the peak memory
    /// libtorch allocated since the previous record, MiB.
    pub memory_mib: f64,
    pub elapsed_s: f64,
}

/// Resident set size of this process in MiB (Linux), 0 elsewhere.
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|pages| pages * 4096.0 / (1024.0 * 1024.0))
        .unwrap_or(0.0)
}
