//! Data-parallel training on CPU (Gloo, 2 processes) against one process on
//! the same global batch: gradients, loss sequences, resume (same and other
//! world size), sharded sampling, Ctrl-C, and a killed rank making the
//! other exit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{
    checkpoints, dim_cmd, losses, names_in, ok, ok_env, read_tensor, s, send_signal, wait_for,
    Config,
};
use tch::Tensor;

/// A tiny class-conditional DiM (label dropout on, so the per-sample
/// dropout draws are compared too) on Fashion-MNIST, f32 on CPU.
fn config(dir: &Path, name: &str, steps: u64, batch: i64, accum: i64, ckpt_every: u64) -> PathBuf {
    Config::tiny()
        .set("model.depth", 2)
        .classes(10, 0.3)
        .learn_sigma(true)
        .set("optim.lr", 1e-3)
        .set("optim.warmup_steps", 2)
        .set("optim.ema_decay", 0.9)
        .set_all(&[
            ("train.steps", steps as i64),
            ("train.batch_size", batch),
            ("train.grad_accum", accum),
            ("train.seed", 5),
            ("train.log_every", 1),
            ("train.ckpt_every", ckpt_every as i64),
            ("train.keep_last", 3),
            ("dist.timeout_s", 15),
        ])
        .set("train.precision", "f32")
        .run_named(dir, name)
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

/// Max |a - b| over every gradient, and the largest gradient value.
fn grad_gap(a: &Path, b: &Path) -> (f64, f64) {
    let (a, b) = (read_grads(a), read_grads(b));
    assert_eq!(a.len(), b.len());
    let (mut worst, mut scale) = (0f64, 0f64);
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        worst = worst.max((ta - tb).abs().max().double_value(&[]));
        scale = scale.max(ta.abs().max().double_value(&[]));
    }
    assert!(
        scale > 1e-4,
        "gradients are all ~0 ({scale}): the comparison would be empty"
    );
    (worst, scale)
}

/// Gradients sent as f16 or bf16 (`dist.compress`) are the average of the
/// ranks' gradients to the wire type's rounding: 2 ranks against one
/// process on the same global batch. A hook that summed instead of
/// averaging would be off by the gradients themselves.
#[test]
fn compressed_gradients_are_the_average_to_wire_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let one = config(dir.path(), "c1", 1, 8, 1, 10);
    let g1 = dir.path().join("g1.safetensors");
    ok_env(
        &["train", "--config", one.to_str().unwrap()],
        &[("DIM_DEBUG_DUMP_GRADS", g1.to_str().unwrap())],
    );
    // Relative rounding of the wire type (each rank's half rounded, then
    // the sum), with room to spare.
    // Lower bound: well above f32's reduction-order differences (the test
    // above: at most 1e-6), well below the wire type's rounding of the
    // largest gradients (f16: 2^-11, bf16: 2^-8 of them).
    for (wire, rel, least) in [("f16", 4e-3, 1e-5), ("bf16", 3e-2, 1e-4)] {
        let cfg = config(dir.path(), &format!("c2-{wire}"), 1, 8, 1, 10);
        let g2 = dir.path().join(format!("g2-{wire}.safetensors"));
        ok_env(
            &[
                "train",
                "--config",
                cfg.to_str().unwrap(),
                "--nproc",
                "2",
                &format!("dist.compress=\"{wire}\""),
            ],
            &[("DIM_DEBUG_DUMP_GRADS", g2.to_str().unwrap())],
        );
        let (worst, scale) = grad_gap(&g1, &g2);
        assert!(
            worst <= rel * scale,
            "{wire}: gradients differ by {worst:e}, more than {rel} of {scale:e}"
        );
        println!("{wire}: max gradient difference {worst:e} of {scale:e}");
        // The wire type really was narrower than f32.
        assert!(
            worst > least * scale,
            "{wire}: hardly any rounding ({worst:e}): was the gradient sent in f32?"
        );
    }
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
    ok_env(
        &["train", "--config", one.to_str().unwrap()],
        &[("DIM_DEBUG_DUMP_GRADS", g1s)],
    );
    let out = ok_env(
        &["train", "--config", two.to_str().unwrap(), "--nproc", "2"],
        &[("DIM_DEBUG_DUMP_GRADS", g2s)],
    );
    // Only rank 0 reports (the final checkpoint's path, once).
    assert_eq!(out.lines().count(), 1, "{out}");

    let (worst, _) = grad_gap(&g1, &g2);
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
        ok(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--resume",
            ckpt10.to_str().unwrap(),
            "--nproc",
            nproc,
        ]);
        let l = losses(&dir.path().join(name));
        assert_same_losses(&l, &l2[10..], 1e-5, &format!("resumed on {nproc} rank(s)"));
    }

    // Sampling spread over 3 ranks (shares of 4, 4 and 3) draws exactly
    // the samples of one process.
    let ckpt = out.trim();
    let mut outs = Vec::new();
    for nproc in ["1", "3"] {
        let o = dir.path().join(format!("samples{nproc}"));
        let printed = common::sample_cpu(
            ckpt,
            &o,
            &[
                "--num", "11", "--batch", "4", "--steps", "3", "--nproc", nproc,
            ],
        );
        assert_eq!(printed.lines().count(), 1, "{printed}");
        let pngs = names_in(&o, |n| n.ends_with(".png")).len();
        assert_eq!(pngs, 12, "11 samples and the grid");
        outs.push(read_tensor(&o.join("samples.safetensors"), "samples"));
    }
    assert_eq!(outs[0].size(), outs[1].size());
    let diff = (&outs[0] - &outs[1]).abs().max().double_value(&[]);
    assert!(diff <= 1e-5, "sharded samples differ by {diff}");
}

/// Every checkpoint in `run` loads (none torn by the crash).
fn checkpoints_intact(run: &Path) -> usize {
    let all = checkpoints(run);
    for p in &all {
        let t = Tensor::read_safetensors(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!t.is_empty());
    }
    all.len()
}

/// `dim train --config cfg --nproc 2` started, its stdout to `stdout`, its
/// stderr piped.
fn launch_2_ranks(cfg: &Path, stdout: Stdio) -> Child {
    dim_cmd(&["train", "--config", &s(cfg), "--nproc", "2"])
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// An endless run `name` (8 samples a step, a checkpoint every 5 steps)
/// that `start` starts from its config; returns what `start` returned and
/// the run folder once step 5's checkpoint is there.
fn endless_run<T>(dir: &Path, name: &str, start: impl FnOnce(&Path) -> T) -> (T, PathBuf) {
    let cfg = config(dir, name, 1_000_000, 8, 1, 5);
    let started = start(&cfg);
    let run = dir.join(name);
    wait_for(
        &run.join("ckpt-000000005.safetensors"),
        Duration::from_secs(120),
    );
    (started, run)
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
    let port = free_port().to_string();
    let ((rank0, mut rank1), run) = endless_run(dir.path(), "crash", |cfg| {
        let spawn = |rank: &str| {
            dim_cmd(&["train", "--config", &s(cfg)])
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
        (spawn("0"), spawn("1"))
    });
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
    let (launcher, run) = endless_run(dir.path(), "crash2", |cfg| {
        launch_2_ranks(cfg, Stdio::null())
    });
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
    send_signal(victim as u32, "9");
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
    let (launcher, run) = endless_run(dir.path(), "int", |cfg| launch_2_ranks(cfg, Stdio::piped()));
    send_signal(launcher.id(), "INT");
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
