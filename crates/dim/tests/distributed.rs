//! Data-parallel training on CPU (Gloo, 2 processes) against one process on
//! the same global batch: gradients, loss sequences, resume (same and other
//! world size), sharded sampling, Ctrl-C, and a killed rank making the
//! other exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;

const DIM: &str = env!("CARGO_BIN_EXE_dim");

/// A tiny class-conditional DiM (label dropout on, so the per-sample
/// dropout draws are compared too) on Fashion-MNIST, f32 on CPU.
fn config(dir: &Path, name: &str, steps: u64, batch: i64, accum: i64, ckpt_every: u64) -> PathBuf {
    let text = format!(
        r#"
[model]
preset = "DiM-S/2"
depth = 2
width = 32
heads = 2
patch = 8
in_channels = 1
input_size = [32, 32]
num_classes = 10
class_dropout_prob = 0.3
learn_sigma = true
dt_rank = 4

[diffusion]
learn_sigma = true

[data]
kind = "fashion_mnist"
transforms = [{{ op = "pad", size = 32 }}]

[loader]
workers = 1

[optim]
lr = 1e-3
warmup_steps = 2
ema_decay = 0.9

[train]
steps = {steps}
batch_size = {batch}
grad_accum = {accum}
seed = 5
device = "cpu"
precision = "f32"
log_every = 1
ckpt_every = {ckpt_every}
keep_last = 3
threads = 1
out_dir = "{}"

[dist]
timeout_s = 15
"#,
        dir.join(name).display()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(DIM)
        .args(args)
        .env("DIM_LOG", "warn")
        .envs(envs.iter().copied())
        .output()
        .expect("run dim")
}

fn ok(args: &[&str], envs: &[(&str, &str)]) -> String {
    let o = run(args, envs);
    assert!(
        o.status.success(),
        "dim {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `(step, loss)` of a run's metrics.jsonl.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn assert_same_losses(a: &[(u64, f64)], b: &[(u64, f64)], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb, "{what}");
        assert!((la - lb).abs() <= tol, "{what}: step {sa}: {la} vs {lb}");
    }
}

fn read_grads(p: &Path) -> Vec<(String, Tensor)> {
    let mut g = Tensor::read_safetensors(p).unwrap();
    g.sort_by(|a, b| a.0.cmp(&b.0));
    g
}

/// One step's averaged gradients and 20 steps' losses of 2 Gloo ranks (with
/// gradient accumulation: 2 micro-batches of 2 samples per rank) equal one
/// process's on the same global batch of 8; then resuming the 2-rank run
/// from its step-10 checkpoint, on 2 ranks and on 1, repeats steps 11..20.
#[test]
fn two_ranks_match_one_process_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let one = config(dir.path(), "one", 20, 8, 1, 10);
    let two = config(dir.path(), "two", 20, 8, 2, 10);
    let (g1, g2) = (
        dir.path().join("g1.safetensors"),
        dir.path().join("g2.safetensors"),
    );
    let g1s = g1.to_str().unwrap();
    let g2s = g2.to_str().unwrap();
    ok(
        &["train", "--config", one.to_str().unwrap()],
        &[("DIM_DEBUG_DUMP_GRADS", g1s)],
    );
    let out = ok(
        &["train", "--config", two.to_str().unwrap(), "--nproc", "2"],
        &[("DIM_DEBUG_DUMP_GRADS", g2s)],
    );
    // Only rank 0 reports (the final checkpoint's path, once).
    assert_eq!(out.lines().count(), 1, "{out}");

    let (a, b) = (read_grads(&g1), read_grads(&g2));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    let mut scale = 0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        worst = worst.max((ta - tb).abs().max().double_value(&[]));
        scale = scale.max(ta.abs().max().double_value(&[]));
    }
    assert!(
        scale > 1e-4,
        "gradients are all ~0 ({scale}): the comparison would be empty"
    );
    assert!(worst <= 1e-6, "gradients differ by {worst}");

    let l1 = losses(&dir.path().join("one"));
    let l2 = losses(&dir.path().join("two"));
    assert_eq!(l1.len(), 20);
    assert_same_losses(&l1, &l2, 1e-5, "1 process vs 2 ranks");
    // Training moved the loss: the sequence is not a constant.
    assert!(l1.iter().any(|(_, l)| (l - l1[0].1).abs() > 1e-3));

    let ckpt10 = dir.path().join("two/ckpt-000000010.safetensors");
    assert!(ckpt10.exists());
    for (name, nproc) in [("resumed2", "2"), ("resumed1", "1")] {
        let cfg = config(dir.path(), name, 20, 8, 2, 10);
        ok(
            &[
                "train",
                "--config",
                cfg.to_str().unwrap(),
                "--resume",
                ckpt10.to_str().unwrap(),
                "--nproc",
                nproc,
            ],
            &[],
        );
        let l = losses(&dir.path().join(name));
        assert_same_losses(&l, &l2[10..], 1e-5, &format!("resumed on {nproc} rank(s)"));
    }

    // Sampling spread over 3 ranks (shares of 4, 4 and 3) draws exactly
    // the samples of one process.
    let ckpt = out.trim();
    let mut outs = Vec::new();
    for nproc in ["1", "3"] {
        let o = dir.path().join(format!("samples{nproc}"));
        let printed = ok(
            &[
                "sample",
                "--checkpoint",
                ckpt,
                "--num",
                "11",
                "--batch",
                "4",
                "--steps",
                "3",
                "--device",
                "cpu",
                "--out",
                o.to_str().unwrap(),
                "--nproc",
                nproc,
            ],
            &[],
        );
        assert_eq!(printed.lines().count(), 1, "{printed}");
        let pngs = std::fs::read_dir(&o)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".png"))
            .count();
        assert_eq!(pngs, 12, "11 samples and the grid");
        let t = Tensor::read_safetensors(o.join("samples.safetensors")).unwrap();
        outs.push(t.into_iter().find(|(n, _)| n == "samples").unwrap().1);
    }
    assert_eq!(outs[0].size(), outs[1].size());
    let diff = (&outs[0] - &outs[1]).abs().max().double_value(&[]);
    assert!(diff <= 1e-5, "sharded samples differ by {diff}");
}

/// Every checkpoint in `run` loads (none torn by the crash).
fn checkpoints_intact(run: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(run).unwrap().flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("ckpt-") && name.ends_with(".safetensors") {
            let t = Tensor::read_safetensors(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!t.is_empty());
            n += 1;
        }
    }
    n
}

fn wait_for(p: &Path, limit: Duration) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(t0.elapsed() < limit, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Ranks started torchrun-style (environment only, no launcher): SIGKILL
/// rank 1 mid-training and rank 0 exits non-zero within the timeout, naming
/// rank 1; its checkpoints are intact. Then the launcher: killing one of its
/// ranks makes `dim train --nproc 2` stop the other and exit non-zero
/// naming the rank, leaving no process behind.
#[test]
fn killed_rank_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "crash", 1_000_000, 8, 1, 5);
    let port = free_port().to_string();
    let spawn = |rank: &str| {
        Command::new(DIM)
            .args(["train", "--config", cfg.to_str().unwrap()])
            .env("DIM_LOG", "warn")
            .env("RANK", rank)
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", rank)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let rank0 = spawn("0");
    let mut rank1 = spawn("1");
    let run = dir.path().join("crash");
    wait_for(
        &run.join("ckpt-000000005.safetensors"),
        Duration::from_secs(120),
    );
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let t0 = Instant::now();
    let out = rank0.wait_with_output().unwrap();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "rank 0 exited 0 after its peer died:\n{err}"
    );
    // timeout_s = 15, plus the heartbeat's check.
    assert!(
        took < Duration::from_secs(30),
        "rank 0 took {took:?} to notice:\n{err}"
    );
    assert!(
        err.contains("rank(s) 1"),
        "the error does not name rank 1:\n{err}"
    );
    assert!(checkpoints_intact(&run) >= 1);

    // Through the launcher.
    let cfg = config(dir.path(), "crash2", 1_000_000, 8, 1, 5);
    let launcher = Command::new(DIM)
        .args(["train", "--config", cfg.to_str().unwrap(), "--nproc", "2"])
        .env("DIM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = dir.path().join("crash2");
    wait_for(
        &run.join("ckpt-000000005.safetensors"),
        Duration::from_secs(120),
    );
    let lpid = launcher.id();
    let children: Vec<i32> = std::fs::read_to_string(format!("/proc/{lpid}/task/{lpid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(children.len(), 2, "{children:?}");
    // The rank of each child, from its environment.
    let rank_of = |pid: i32| -> String {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        env.split(|b| *b == 0)
            .find_map(|kv| {
                kv.strip_prefix(b"RANK=")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .unwrap()
    };
    let victim = children
        .iter()
        .copied()
        .find(|&p| rank_of(p) == "1")
        .unwrap();
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let out = launcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("rank 1 of 2 failed"), "{err}");
    for pid in children {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "rank process {pid} is still running"
        );
    }
    assert!(checkpoints_intact(&run) >= 1);
}

/// Ctrl-C to the launcher: it forwards one SIGINT, the ranks agree to stop
/// at the same step, rank 0 checkpoints there and everything exits 0.
#[test]
fn ctrl_c_stops_all_ranks_at_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "int", 1_000_000, 8, 1, 5);
    let launcher = Command::new(DIM)
        .args(["train", "--config", cfg.to_str().unwrap(), "--nproc", "2"])
        .env("DIM_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = dir.path().join("int");
    wait_for(
        &run.join("ckpt-000000005.safetensors"),
        Duration::from_secs(120),
    );
    Command::new("kill")
        .args(["-INT", &launcher.id().to_string()])
        .status()
        .unwrap();
    let out = launcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let last = losses(&run).last().unwrap().0;
    assert!(
        printed.ends_with(&format!("ckpt-{last:09}.safetensors")),
        "{printed} vs step {last}"
    );
    assert!(Path::new(&printed).exists());
    assert!(checkpoints_intact(&run) >= 2);
}
