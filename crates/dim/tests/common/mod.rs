//! Shared by the `dim` binary's integration tests: a small TOML config
//! builder with overrides, run-`dim` helpers that assert success or failure
//! and return stdout or stderr, and readers of what a run leaves behind
//! (metrics, checkpoints, tensors, images).
//!
//! Each test file uses a part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tch::Tensor;

/// The `dim` binary of this build.
pub const DIM: &str = env!("CARGO_BIN_EXE_dim");

/// A path as the text a command line takes.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A `dim` command with `args`, logging warnings only (stdout and stderr as
/// `Command` defaults them: for spawning, set them as needed).
pub fn dim_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(DIM);
    c.args(args).env("DIM_LOG", "warn");
    c
}

/// Runs `dim args` with extra environment variables to the end.
pub fn run_env(args: &[&str], envs: &[(&str, &str)]) -> Output {
    dim_cmd(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run dim")
}

/// Runs `dim args` to the end.
pub fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

/// The stdout of a finished `dim` that must have succeeded; `what` names it
/// in the failure message, which shows both streams.
pub fn succeeded(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The stderr of a finished `dim` that must have failed.
pub fn failed(o: &Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what} should have failed:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `dim args` with extra environment variables, which must succeed; its stdout.
pub fn ok_env(args: &[&str], envs: &[(&str, &str)]) -> String {
    succeeded(&run_env(args, envs), &format!("dim {args:?}"))
}

/// `dim args`, which must succeed; its stdout.
pub fn ok(args: &[&str]) -> String {
    ok_env(args, &[])
}

/// `dim args`, which must fail; its stderr.
pub fn err(args: &[&str]) -> String {
    failed(&run(args), &format!("dim {args:?}"))
}

/// `dim sample --checkpoint ckpt --out out --device cpu` plus `extra`,
/// which must succeed; its stdout.
pub fn sample_cpu(ckpt: &str, out: &Path, extra: &[&str]) -> String {
    let out = s(out);
    let mut args = vec![
        "sample",
        "--checkpoint",
        ckpt,
        "--out",
        &out,
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

/// Sends `signal` (a `kill` name: `INT`, `9`) to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let st = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{signal} {pid} failed");
}

/// Polls `done` every 100 ms; panics naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `p` to exist.
pub fn wait_for(p: &Path, limit: Duration) {
    wait_until(limit, &format!("{} never appeared", p.display()), || {
        p.exists()
    });
}

/// The records of a run's `metrics.jsonl` (none when it is not there yet);
/// a line that is not JSON (torn by a crash) fails the test.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("torn metrics line {line:?}: {e}"))
        })
        .collect()
}

/// How many lines a run's `metrics.jsonl` has now (a line being written
/// counts): for waiting on a run that is still going.
pub fn logged_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// `(step, loss)` of each record of a run's `metrics.jsonl`, in file order.
pub fn losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run)
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The sorted names of the entries of `dir` that `keep` accepts; none when
/// `dir` does not exist (yet).
pub fn names_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| keep(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The checkpoints (`ckpt-*.safetensors`) of a run folder, oldest first.
pub fn checkpoints(run: &Path) -> Vec<PathBuf> {
    names_in(run, |n| {
        n.starts_with("ckpt-") && n.ends_with(".safetensors")
    })
    .into_iter()
    .map(|n| run.join(n))
    .collect()
}

/// Every tensor of a safetensors file, by name.
pub fn read_tensors(p: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .into_iter()
        .collect()
}

/// The tensor `name` of a safetensors file.
pub fn read_tensor(p: &Path, name: &str) -> Tensor {
    read_tensors(p)
        .remove(name)
        .unwrap_or_else(|| panic!("{}: no tensor `{name}`", p.display()))
}

/// `(width, height)` of a PNG file.
pub fn image_size(p: &Path) -> (u32, u32) {
    // PNG IHDR: width and height are big-endian at bytes 16..24.
    let b = std::fs::read(p).unwrap();
    (
        u32::from_be_bytes(b[16..20].try_into().unwrap()),
        u32::from_be_bytes(b[20..24].try_into().unwrap()),
    )
}

/// A run config for the tests, as a TOML table that overrides edit.
#[derive(Clone, Debug)]
pub struct Config {
    table: toml::Table,
}

impl Config {
    /// A config from TOML text.
    pub fn parse(text: &str) -> Self {
        Self {
            table: text.parse().unwrap_or_else(|e| panic!("{e}\n{text}")),
        }
    }

    /// The tests' tiny DiM on Fashion-MNIST padded to 32×32 (patch 8: 16
    /// tokens of width 32), one loader worker, one CPU thread. Depth,
    /// classes, `learn_sigma`, sampler, optimiser and the run's length are
    /// each test's own.
    pub fn tiny() -> Self {
        Self::parse(
            r#"
[model]
preset = "DiM-S/2"
width = 32
heads = 2
patch = 8
in_channels = 1
input_size = [32, 32]
dt_rank = 4

[data]
kind = "fashion_mnist"
transforms = [{ op = "pad", size = 32 }]

[loader]
workers = 1

[train]
device = "cpu"
threads = 1
"#,
        )
    }

    /// Sets `key` (dotted: `train.steps`) to `value`, creating tables on the way.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let (path, last) = match key.rsplit_once('.') {
            Some((path, last)) => (Some(path), last),
            None => (None, key),
        };
        let mut table = &mut self.table;
        for part in path.into_iter().flat_map(|p| p.split('.')) {
            table = table
                .entry(part)
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("`{part}` of `{key}` is not a table"));
        }
        table.insert(last.to_string(), value.into());
        self
    }

    /// Sets `key` to a value written in TOML (arrays, inline tables).
    pub fn set_toml(self, key: &str, value: &str) -> Self {
        let v: toml::Table = format!("v = {value}")
            .parse()
            .unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        self.set(key, v["v"].clone())
    }

    /// Sets `key` to a path.
    pub fn set_path(self, key: &str, p: &Path) -> Self {
        self.set(key, s(p))
    }

    /// `learn_sigma` of the model and of the diffusion together (they must agree).
    pub fn learn_sigma(self, on: bool) -> Self {
        self.set("model.learn_sigma", on)
            .set("diffusion.learn_sigma", on)
    }

    /// Class-conditional on `n` classes with label dropout `p`; `n = 0`:
    /// unconditional.
    pub fn classes(self, n: i64, dropout: f64) -> Self {
        self.set("model.num_classes", n)
            .set("model.class_dropout_prob", dropout)
    }

    /// The DDIM sampler with `steps` steps.
    pub fn ddim(self, steps: i64) -> Self {
        self.set("sampler.sampler", "ddim")
            .set("sampler.steps", steps)
    }

    /// Sets every `(key, value)` of `pairs` (same value type).
    pub fn set_all<V: Into<toml::Value> + Copy>(self, pairs: &[(&str, V)]) -> Self {
        pairs.iter().fold(self, |c, &(k, v)| c.set(k, v))
    }

    /// Writes the config to `path`; returns `path`.
    pub fn save(&self, path: &Path) -> PathBuf {
        std::fs::write(path, toml::to_string(&self.table).unwrap()).unwrap();
        path.to_path_buf()
    }

    /// A run writing to `out`: saved as `<dir>/<out's name>.toml`; returns
    /// that path.
    pub fn run_in(self, dir: &Path, out: &Path) -> PathBuf {
        let name = out.file_name().unwrap().to_string_lossy().into_owned();
        self.set_path("train.out_dir", out)
            .save(&dir.join(format!("{name}.toml")))
    }

    /// A run writing to `<dir>/<name>`, its config at `<dir>/<name>.toml`.
    pub fn run_named(self, dir: &Path, name: &str) -> PathBuf {
        self.run_in(dir, &dir.join(name))
    }
}

/// A `[data]` table of Moving Fashion-MNIST: `len` clips of `frames` 32×32
/// frames, one item each, speeds 1 to `max_speed`, generator `seed`.
pub fn moving_fmnist(len: usize, frames: usize, seed: u64, max_speed: f64) -> toml::Value {
    let text = format!(
        "kind = \"moving_fashion_mnist\"\nmoving = {{ len = {len}, frames = {frames}, canvas = 32, items = 1, seed = {seed}, min_speed = 1.0, max_speed = {max_speed:?} }}\n"
    );
    toml::Value::Table(text.parse().unwrap())
}
