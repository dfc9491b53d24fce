//! `cargo xtask repro <experiment>`: trains every arm of an experiment file
//! (one arm per GPU when several are visible, one after the other
//! otherwise), samples and evaluates each with the `dim` binary, and writes a
//! report folder:
//!
//! - `report.md`: the environment (commit, devices, driver, library
//!   versions), the results table, the plots and the sample grids;
//! - `plots/*.png` drawn in Rust, each with its data as `plots/*.json`;
//! - `grids/*.png`: the sample grids;
//! - `metrics.json`: every logged training line and every evaluation;
//! - `logs/`: the `dim` logs and each run's `metrics.jsonl`;
//! - `evals/`: every `dim eval` report;
//! - `work/` (or `--work DIR`): checkpoints and samples (large, not meant to
//!   be carried back).
//!
//! Needs no Rust toolchain: the experiment bundle carries this binary
//! (`bin/xtask repro ...`).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::experiment::{tokens, Experiment, Run, SamplerSpec};
use crate::plot::{self, Chart, Series};

/// What `repro` was asked to do.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Experiment name (`xtask/experiments/<name>.toml`) or path.
    pub experiment: String,
    /// Report folder (default `runs/repro/<name>`).
    pub out: Option<PathBuf>,
    /// The `dim` binary.
    pub dim: PathBuf,
    /// `key=value` overrides of the experiment file.
    pub sets: Vec<String>,
    /// Checkpoints and samples (default `<out>/work`): elsewhere keeps the
    /// report folder small enough to carry back from a GPU machine.
    pub work: Option<PathBuf>,
}

/// One evaluation: a run sampled with one sampler at one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Eval {
    pub sampler: String,
    pub step: u64,
    pub num: u64,
    /// `dim eval`'s JSON report (`fid`, `precision`, `recall`, ...).
    pub report: Value,
}

/// Everything measured for one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub name: String,
    pub arm: String,
    pub group: String,
    pub config: PathBuf,
    pub overrides: Vec<String>,
    pub seed: u64,
    pub device: String,
    pub tokens: Option<u64>,
    pub train_wall_s: f64,
    pub checkpoint: String,
    /// The run's `metrics.jsonl`, line by line.
    pub metrics: Vec<Value>,
    /// Final evaluations (one per sampler) and the FID curve's points.
    pub evals: Vec<Eval>,
    pub curve: Vec<Eval>,
    pub grids: Vec<String>,
}

impl RunReport {
    fn series(&self, x: &str, y: &str) -> Vec<(f64, f64)> {
        self.metrics
            .iter()
            .filter_map(|m| Some((m[x].as_f64()?, m[y].as_f64()?)))
            .collect()
    }

    /// Median images/s over the logged lines after the first (warm-up).
    pub fn images_per_s(&self) -> Option<f64> {
        let mut v: Vec<f64> = self
            .metrics
            .iter()
            .skip(usize::from(self.metrics.len() > 1))
            .filter_map(|m| m["images_per_s"].as_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    }

    pub fn peak_memory_mib(&self) -> Option<f64> {
        self.metrics
            .iter()
            .filter_map(|m| m["memory_mib"].as_f64())
            .reduce(f64::max)
    }
}

/// The whole report, as `metrics.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub experiment: Experiment,
    pub experiment_file: PathBuf,
    pub command: String,
    pub environment: Vec<(String, String)>,
    pub runs: Vec<RunReport>,
    pub floor: Option<Value>,
    pub features: Option<String>,
}

pub fn run(opts: &Opts) -> Result<PathBuf> {
    let (exp, exp_path) = Experiment::load(&opts.experiment, &opts.sets)?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| Path::new("runs/repro").join(&exp.name));
    let dim = fs::canonicalize(&opts.dim).with_context(|| {
        format!(
            "no dim binary at {} (build it with `cargo build --release -p dim`, or pass --dim)",
            opts.dim.display()
        )
    })?;
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    for sub in ["plots", "grids", "logs"] {
        fs::create_dir_all(out.join(sub))
            .with_context(|| format!("creating {}", out.join(sub).display()))?;
    }
    let out = fs::canonicalize(&out)?;
    let work = opts.work.clone().unwrap_or_else(|| out.join("work"));
    if opts.work.is_some() && work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let work = fs::canonicalize(&work)?;
    let devices = devices(&exp.device)?;
    let runs = exp.runs();
    let ctx = Ctx {
        exp: &exp,
        dim: &dim,
        out: &out,
        work: &work,
    };
    log(&format!(
        "repro {}: {} runs on {}; report in {}",
        exp.name,
        runs.len(),
        devices.join(" "),
        out.display()
    ));

    // 1. Training, one run per device at a time.
    let trained = on_devices(&runs, &devices, |r, dev| ctx.train(r, dev))?;

    // 2. The feature network, then sampling and evaluation per run.
    let reference = exp.metrics.reference.clone();
    let (features, features_text) =
        match (&reference, &exp.metrics.features_weights) {
            (None, _) => (None, None),
            (Some(_), Some(w)) => (
                Some(fs::canonicalize(w).with_context(|| {
                    format!("[metrics] features_weights: no file {}", w.display())
                })?),
                None,
            ),
            (Some(_), None) => {
                let (w, text) = ctx.train_features(&devices[0])?;
                (Some(w), Some(text))
            }
        };
    let evaluated = on_devices(&trained, &devices, |r, dev| {
        ctx.sample_and_eval(r.clone(), dev, features.as_deref())
    })?;
    let floor = match (&exp.metrics.floor, &reference, &features) {
        (Some(floor), Some(reference), Some(w)) => {
            Some(ctx.eval("floor", floor, reference, w, &devices[0], None)?)
        }
        _ => None,
    };

    // 3. The report.
    let report = Report {
        experiment: exp.clone(),
        experiment_file: exp_path.clone(),
        command: rerun_command(&exp_path, &opts.sets),
        environment: environment(&dim, &devices),
        runs: evaluated,
        floor,
        features: features_text,
    };
    write_report(&out, &report)?;
    log(&format!(
        "repro {}: report {}",
        exp.name,
        out.join("report.md").display()
    ));
    Ok(out)
}

fn log(msg: &str) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    println!("[{h:02}:{m:02}:{s:02}] {msg}");
}

/// `cpu`, or every visible CUDA device (`cuda:0`, ...): one run per device.
fn devices(kind: &str) -> Result<Vec<String>> {
    let gpus = gpu_count();
    match kind {
        "cpu" => Ok(vec!["cpu".into()]),
        "cuda" if gpus == 0 => bail!("the experiment asks for device = \"cuda\" but nvidia-smi lists no GPU (use --set device=cpu)"),
        "cuda" | "auto" if gpus > 0 => Ok((0..gpus).map(|i| format!("cuda:{i}")).collect()),
        "auto" => Ok(vec!["cpu".into()]),
        other => bail!("device = \"{other}\": use cuda, cpu or auto"),
    }
}

/// Visible GPUs: `CUDA_VISIBLE_DEVICES` if set, else what nvidia-smi lists.
fn gpu_count() -> usize {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return v.split(',').filter(|s| !s.trim().is_empty()).count();
    }
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU"))
                .count()
        })
        .unwrap_or(0)
}

/// Runs `f` on every item, one item per device at a time (a thread per
/// device taking items from a queue); fails after all finished if any failed.
fn on_devices<T: Sync, R: Send>(
    items: &[T],
    devices: &[String],
    f: impl Fn(&T, &str) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let queue = Mutex::new((0..items.len()).collect::<VecDeque<_>>());
    let results: Mutex<Vec<Option<Result<R>>>> =
        Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for dev in devices {
            s.spawn(|| loop {
                let Some(i) = queue.lock().unwrap().pop_front() else {
                    break;
                };
                let r = f(&items[i], dev);
                results.lock().unwrap()[i] = Some(r);
            });
        }
    });
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for r in results.into_inner().unwrap() {
        match r.expect("every item ran") {
            Ok(v) => out.push(v),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{} run(s) failed:\n  {}", errors.len(), errors.join("\n  "));
    }
    Ok(out)
}

struct Ctx<'a> {
    exp: &'a Experiment,
    dim: &'a Path,
    out: &'a Path,
    work: &'a Path,
}

impl Ctx<'_> {
    /// Runs `dim args...`, stderr to `logs/<log>`; returns stdout.
    fn dim(&self, args: &[String], log_name: &str) -> Result<String> {
        let log_path = self.out.join("logs").join(log_name);
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(self.dim);
        // From the experiment bundle: its copy of Fashion-MNIST.
        if std::env::var_os("DIM_FASHION_MNIST_DIR").is_none()
            && Path::new("data/fashion-mnist").is_dir()
        {
            cmd.env(
                "DIM_FASHION_MNIST_DIR",
                fs::canonicalize("data/fashion-mnist")?,
            );
        }
        let out = cmd
            .args(args)
            .stderr(Stdio::from(log_file))
            .output()
            .with_context(|| format!("starting {}", self.dim.display()))?;
        if !out.status.success() {
            let text = fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            bail!(
                "`dim {}` failed ({}); log {}:\n    {}",
                args.join(" "),
                out.status,
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n    ")
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    fn train(&self, r: &Run, dev: &str) -> Result<RunReport> {
        let b = &self.exp.budget;
        let work = self.run_dir(&r.name);
        let mut args: Vec<String> = vec![
            "train".into(),
            "--config".into(),
            r.arm.config.display().to_string(),
        ];
        args.extend(r.arm.overrides.iter().cloned());
        if let Some(steps) = b.steps {
            args.push(format!("train.steps={steps}"));
        }
        if let Some(t) = b.time_limit_s {
            args.push(format!("train.time_limit_s={t}"));
        }
        if self.exp.metrics.curve_num > 0 {
            // The FID curve evaluates every checkpoint: keep them all.
            args.push("train.keep_last=100000".into());
        }
        args.extend([
            format!("train.seed={}", r.seed),
            format!("train.device=\"{dev}\""),
            format!("train.out_dir=\"{}\"", work.display()),
        ]);
        log(&format!("{}: training on {dev}", r.name));
        let t0 = Instant::now();
        let stdout = self.dim(&args, &format!("{}.train.log", r.name))?;
        let wall = t0.elapsed().as_secs_f64();
        let checkpoint = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .with_context(|| format!("{}: dim train printed no checkpoint", r.name))?;
        let metrics = read_jsonl(&work.join("metrics.jsonl"))?;
        let cfg = r.resolved_config()?;
        let last = metrics.last().cloned().unwrap_or(Value::Null);
        log(&format!(
            "{}: trained in {wall:.0} s, last line {last}",
            r.name
        ));
        fs::copy(
            work.join("metrics.jsonl"),
            self.out
                .join("logs")
                .join(format!("{}.metrics.jsonl", r.name)),
        )?;
        Ok(RunReport {
            name: r.name.clone(),
            arm: r.arm.name.clone(),
            group: r.arm.group.clone().unwrap_or_else(|| r.arm.name.clone()),
            config: r.arm.config.clone(),
            overrides: r.arm.overrides.clone(),
            seed: r.seed,
            device: dev.to_string(),
            tokens: tokens(&cfg),
            train_wall_s: wall,
            checkpoint,
            metrics,
            evals: Vec::new(),
            curve: Vec::new(),
            grids: Vec::new(),
        })
    }

    fn train_features(&self, dev: &str) -> Result<(PathBuf, String)> {
        let w = self.work.join("features.safetensors");
        let epochs = self.exp.metrics.features_epochs.unwrap_or(5);
        log(&format!("feature classifier: {epochs} epochs on {dev}"));
        let text = self.dim(
            &[
                "train-features".into(),
                "--out".into(),
                w.display().to_string(),
                "--epochs".into(),
                epochs.to_string(),
                "--device".into(),
                dev.into(),
            ],
            "features.log",
        )?;
        Ok((w, text.trim().to_string()))
    }

    /// `dim eval` of `samples` against `reference`; `num` limits the samples.
    fn eval(
        &self,
        name: &str,
        samples: &str,
        reference: &str,
        weights: &Path,
        dev: &str,
        num: Option<u64>,
    ) -> Result<Value> {
        let json = self.work.join(format!("{name}.eval.json"));
        let mut args: Vec<String> = vec![
            "eval".into(),
            "--samples".into(),
            samples.into(),
            "--reference".into(),
            reference.into(),
            "--weights".into(),
            weights.display().to_string(),
            "--device".into(),
            dev.into(),
            "--json".into(),
            json.display().to_string(),
        ];
        if let Some(n) = num {
            args.extend(["--num".into(), n.to_string()]);
        }
        self.dim(&args, &format!("{name}.eval.log"))?;
        fs::create_dir_all(self.out.join("evals"))?;
        fs::copy(&json, self.out.join("evals").join(format!("{name}.json")))?;
        let text = fs::read_to_string(&json)?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", json.display()))
    }

    /// `dim sample` into `dir`; returns the folder.
    fn sample(
        &self,
        r: &RunReport,
        ckpt: &str,
        s: &SamplerSpec,
        num: u64,
        cfg: f64,
        dir: &Path,
        dev: &str,
    ) -> Result<()> {
        let mut args: Vec<String> = vec![
            "sample".into(),
            "--checkpoint".into(),
            ckpt.into(),
            "--num".into(),
            num.to_string(),
            "--batch".into(),
            s.batch.min(num).to_string(),
            "--cfg".into(),
            cfg.to_string(),
            "--seed".into(),
            r.seed.to_string(),
            "--device".into(),
            dev.into(),
            "--out".into(),
            dir.display().to_string(),
        ];
        if let Some(k) = &s.sampler {
            args.extend(["--sampler".into(), k.clone()]);
        }
        if let Some(n) = s.steps {
            args.extend(["--steps".into(), n.to_string()]);
        }
        self.dim(&args, &format!("{}.sample.log", r.name))
            .map(|_| ())
    }

    fn sample_and_eval(
        &self,
        mut r: RunReport,
        dev: &str,
        features: Option<&Path>,
    ) -> Result<RunReport> {
        let m = &self.exp.metrics;
        let work = self.run_dir(&r.name);
        let final_step = r
            .metrics
            .last()
            .and_then(|l| l["step"].as_u64())
            .unwrap_or(0);
        let ckpt = r.checkpoint.clone();
        for s in &self.exp.samplers {
            log(&format!(
                "{}: sampling {} x{} on {dev}",
                r.name, s.name, s.num
            ));
            let dir = work.join(format!("samples_{}", s.name));
            self.sample(&r, &ckpt, s, s.num, s.cfg, &dir, dev)?;
            let grid = format!("grids/{}_{}.png", r.name, s.name);
            fs::copy(dir.join("grid.png"), self.out.join(&grid))?;
            r.grids.push(grid);
            if let (Some(reference), Some(w)) = (&m.reference, features) {
                let name = format!("{}_{}", r.name, s.name);
                let report =
                    self.eval(&name, &dir.display().to_string(), reference, w, dev, None)?;
                log(&format!("{name}: {report}"));
                r.evals.push(Eval {
                    sampler: s.name.clone(),
                    step: final_step,
                    num: s.num,
                    report,
                });
            }
        }
        let Some(first) = self.exp.samplers.first() else {
            return Ok(r);
        };
        if m.guided_grid_cfg > 0.0 {
            let dir = work.join("guided");
            self.sample(&r, &ckpt, first, 100, m.guided_grid_cfg, &dir, dev)?;
            let grid = format!(
                "grids/{}_{}_cfg{}.png",
                r.name, first.name, m.guided_grid_cfg
            );
            fs::copy(dir.join("grid.png"), self.out.join(&grid))?;
            r.grids.push(grid);
        }
        if let (true, Some(reference), Some(w)) = (m.curve_num > 0, &m.reference, features) {
            for (step, path) in checkpoints(&work)? {
                let dir = work.join(format!("curve_{step}"));
                let ck = path.display().to_string();
                self.sample(&r, &ck, first, m.curve_num, first.cfg, &dir, dev)?;
                let name = format!("{}_curve_{step}", r.name);
                let report =
                    self.eval(&name, &dir.display().to_string(), reference, w, dev, None)?;
                r.curve.push(Eval {
                    sampler: first.name.clone(),
                    step,
                    num: m.curve_num,
                    report,
                });
            }
        }
        Ok(r)
    }
}

/// `ckpt-<step>.safetensors` files of a run folder, by step.
fn checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut v: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let step = n
                .strip_prefix("ckpt-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    Ok(v)
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))
        })
        .collect()
}

fn capture(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

/// The commit: the `COMMIT` file of the bundle this binary runs from
/// (`<bundle>/bin/xtask` beside `<bundle>/COMMIT`: the commit it was built
/// from, even when run inside a copy of another checkout), else `git`.
pub fn commit() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("COMMIT")))
        .and_then(|p| fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            let dirty = capture("git", &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            capture("git", &["rev-parse", "--short=10", "HEAD"]).map(|c| {
                if dirty {
                    format!("{c}+dirty")
                } else {
                    c
                }
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Devices with name and driver, from nvidia-smi (`None` without a GPU).
pub fn gpus() -> Option<String> {
    capture(
        "nvidia-smi",
        &[
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ],
    )
}

pub fn cpu_model() -> String {
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores")
}

pub fn utc_now() -> String {
    capture("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".into())
}

fn environment(dim: &Path, devices: &[String]) -> Vec<(String, String)> {
    let mut env = vec![
        ("commit".into(), commit()),
        ("date".into(), utc_now()),
        ("host".into(), capture("hostname", &[]).unwrap_or_default()),
        ("cpu".into(), cpu_model()),
        (
            "gpus (name, driver, memory)".into(),
            gpus().map_or("none".into(), |g| g.replace('\n', "; ")),
        ),
        ("devices used".into(), devices.join(" ")),
        (
            "dim".into(),
            capture(&dim.display().to_string(), &["--version"]).unwrap_or_default(),
        ),
        ("tch".into(), "0.24.0 (libtorch 2.11.0)".into()),
    ];
    let torch = ["python3", ".venv/bin/python"].iter().find_map(|py| {
        capture(
            py,
            &[
                "-c",
                "import torch; print(torch.__version__, 'cuda', torch.version.cuda)",
            ],
        )
    });
    env.push((
        "python torch".into(),
        torch.unwrap_or_else(|| "not found".into()),
    ));
    env
}

fn rerun_command(exp_path: &Path, sets: &[String]) -> String {
    let name = exp_path
        .file_stem()
        .map_or("?".into(), |s| s.to_string_lossy().into_owned());
    let mut cmd = format!("cargo xtask repro {name}");
    for s in sets {
        write!(cmd, " --set '{s}'").unwrap();
    }
    cmd
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// The charts of a report, from its runs (the JSON beside each PNG holds these points).
pub fn charts(report: &Report) -> Vec<(&'static str, Chart)> {
    let runs = &report.runs;
    let per_run = |x: &str, y: &str| -> Vec<Series> {
        runs.iter()
            .map(|r| Series {
                name: r.name.clone(),
                points: r.series(x, y),
            })
            .collect()
    };
    let exp = &report.experiment.name;
    let chart =
        |what: &str, x_label: &str, y_label: &str, log_y: bool, series: Vec<Series>| Chart {
            title: format!("{exp}: {what}"),
            x_label: x_label.into(),
            y_label: y_label.into(),
            log_y,
            series,
        };
    let mut out = vec![
        (
            "loss_vs_step",
            chart(
                "training loss",
                "step",
                "loss",
                true,
                per_run("step", "loss"),
            ),
        ),
        (
            "loss_vs_time",
            chart(
                "training loss against wall time",
                "wall time (s)",
                "loss",
                true,
                per_run("elapsed_s", "loss"),
            ),
        ),
    ];
    // FID: the curve where there is one, else the final evaluations.
    let mut fid = Vec::new();
    for r in runs {
        for s in &report.experiment.samplers {
            let src = if r.curve.is_empty() {
                &r.evals
            } else {
                &r.curve
            };
            let points: Vec<(f64, f64)> = src
                .iter()
                .filter(|e| e.sampler == s.name)
                .filter_map(|e| Some((e.step as f64, e.report["fid"].as_f64()?)))
                .collect();
            if !points.is_empty() {
                fid.push(Series {
                    name: format!("{} {}", r.name, s.name),
                    points,
                });
            }
        }
    }
    // Throughput and memory against tokens: one line per group of arms.
    let by_group = |f: &dyn Fn(&RunReport) -> Option<f64>| -> Vec<Series> {
        let mut groups: Vec<Series> = Vec::new();
        for r in runs {
            let (Some(t), Some(y)) = (r.tokens, f(r)) else {
                continue;
            };
            match groups.iter_mut().find(|g| g.name == r.group) {
                Some(g) => g.points.push((t as f64, y)),
                None => groups.push(Series {
                    name: r.group.clone(),
                    points: vec![(t as f64, y)],
                }),
            }
        }
        for g in &mut groups {
            g.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        groups
    };
    // These only where there is something to draw.
    let optional = [
        (
            "fid_vs_step",
            chart("FID against training step", "step", "FID", false, fid),
        ),
        (
            "throughput_vs_tokens",
            chart(
                "training throughput",
                "tokens per sample",
                "images/s (median)",
                false,
                by_group(&|r| r.images_per_s()),
            ),
        ),
        (
            "memory_vs_tokens",
            chart(
                "peak training memory",
                "tokens per sample",
                "memory (MiB)",
                false,
                by_group(&|r| r.peak_memory_mib()),
            ),
        ),
    ];
    out.extend(optional.into_iter().filter(|(_, c)| !c.series.is_empty()));
    out
}

fn write_report(out: &Path, report: &Report) -> Result<()> {
    fs::write(
        out.join("metrics.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    let charts = charts(report);
    for (name, chart) in &charts {
        plot::draw(&out.join("plots"), name, chart)?;
    }
    let exp = &report.experiment;
    let mut md = String::new();
    writeln!(md, "# Experiment `{}`\n", exp.name)?;
    if !exp.description.is_empty() {
        writeln!(md, "{}\n", exp.description)?;
    }
    writeln!(
        md,
        "Made by `cargo xtask repro` from `{}`. To rerun:\n\n```sh\n{}\n```\n",
        report.experiment_file.display(),
        report.command
    )?;
    let budget = match (exp.budget.steps, exp.budget.time_limit_s) {
        (Some(s), Some(t)) => format!("{s} steps or {t} s of training, whichever comes first"),
        (Some(s), None) => format!("{s} steps"),
        (None, Some(t)) => format!("{t} s of training"),
        (None, None) => "-".into(),
    };
    writeln!(md, "Budget per run: {budget}; seeds: {:?}.\n", exp.seeds)?;
    writeln!(md, "## Environment\n\n| | |\n|---|---|")?;
    for (k, v) in &report.environment {
        writeln!(md, "| {k} | {} |", v.replace('|', "/"))?;
    }
    writeln!(
        md,
        "\n## Arms\n\n| arm | config | overrides |\n|---|---|---|"
    )?;
    for a in &exp.arms {
        writeln!(
            md,
            "| {} | `{}` | {} |",
            a.name,
            a.config.display(),
            if a.overrides.is_empty() {
                "–".into()
            } else {
                a.overrides
                    .iter()
                    .map(|o| format!("`{o}`"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        )?;
    }
    writeln!(md, "\n## Results\n")?;
    writeln!(
        md,
        "| run | device | tokens | steps | train wall (s) | last loss | images/s | peak memory (MiB) | sampler | samples | FID ↓ | precision | recall |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in &report.runs {
        let last = r.metrics.last();
        let head = format!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            r.name,
            r.device,
            r.tokens.map_or("–".into(), |t| t.to_string()),
            last.and_then(|l| l["step"].as_u64())
                .map_or("–".into(), |s| s.to_string()),
            r.train_wall_s,
            fmt_opt(last.and_then(|l| l["loss"].as_f64()), 4),
            fmt_opt(r.images_per_s(), 0),
            fmt_opt(r.peak_memory_mib(), 0),
        );
        if r.evals.is_empty() {
            writeln!(md, "{head} – | – | – | – | – |")?;
        }
        for e in &r.evals {
            writeln!(
                md,
                "{head} {} | {} | {} | {} | {} |",
                e.sampler,
                e.num,
                fmt_opt(e.report["fid"].as_f64(), 3),
                fmt_opt(e.report["precision"].as_f64(), 3),
                fmt_opt(e.report["recall"].as_f64(), 3),
            )?;
        }
    }
    if let (Some(f), Some(set)) = (&report.floor, &exp.metrics.floor) {
        writeln!(
            md,
            "| floor: `{set}` against the reference | – | – | – | – | – | – | – | – | {} | {} | {} | {} |",
            f["num_generated"].as_u64().map_or("–".into(), |n| n.to_string()),
            fmt_opt(f["fid"].as_f64(), 3),
            fmt_opt(f["precision"].as_f64(), 3),
            fmt_opt(f["recall"].as_f64(), 3),
        )?;
    }
    if let Some(reference) = &exp.metrics.reference {
        writeln!(
            md,
            "\nFID, precision and recall against `{reference}` with the project's feature classifier{}. Images/s is the median of the logged lines after the first.",
            match (&report.features, &exp.metrics.features_epochs) {
                (Some(text), Some(e)) => format!(" (`dim train-features --epochs {e}` in this run: {text})"),
                _ => String::new(),
            }
        )?;
    }
    writeln!(md, "\n## Plots\n")?;
    for (name, chart) in &charts {
        writeln!(md, "![{}](plots/{name}.png)\n", chart.title)?;
    }
    let grids: Vec<&String> = report.runs.iter().flat_map(|r| &r.grids).collect();
    if !grids.is_empty() {
        writeln!(md, "## Sample grids\n")?;
        for g in grids {
            writeln!(md, "`{g}`\n\n![{g}]({g})\n")?;
        }
    }
    fs::write(out.join("report.md"), md)?;
    Ok(())
}
