//! Fault tests of `dim train` on CPU: SIGKILL at random moments (some of them
//! in the middle of a checkpoint write), and a disk that fills up during a
//! checkpoint. After each fault the newest checkpoint is intact, and a
//! resumed run continues the exact loss sequence of an uninterrupted one.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{checkpoints, dim_cmd, names_in, s, Config};

/// Steps of the run; a checkpoint every step, so kills often land in a write.
const STEPS: u64 = 30;
const KILLS: usize = 20;

/// A tiny unconditional DiM on Fashion-MNIST (16 tokens, 1 block), writing to `out`.
fn config(dir: &Path, out: &Path) -> PathBuf {
    Config::tiny()
        .set("model.depth", 1)
        .classes(0, 0.0)
        .learn_sigma(false)
        .ddim(2)
        .set("optim.lr", 1e-3)
        .set_all(&[
            ("train.steps", STEPS as i64),
            ("train.batch_size", 4),
            ("train.seed", 11),
            ("train.log_every", 1),
            ("train.ckpt_every", 1),
            ("train.keep_last", 2),
        ])
        .run_in(dir, out)
}

fn train(cfg: &Path, extra: &[&str]) -> Command {
    let mut c = dim_cmd(&["train", "--config", &s(cfg)]);
    c.args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Every logged (step, loss); a step logged twice (redone after a kill)
/// must carry the same loss both times.
fn losses(run: &Path) -> BTreeMap<u64, f64> {
    let mut out = BTreeMap::new();
    for (step, loss) in common::losses(run) {
        if let Some(before) = out.insert(step, loss) {
            assert_eq!(before, loss, "step {step} redone with another loss");
        }
    }
    out
}

fn temp_files(dir: &Path) -> Vec<String> {
    names_in(dir, |n| n.ends_with(".tmp"))
}

/// Reads a checkpoint whole: header, every tensor, the config and step.
fn assert_intact(p: &Path) -> u64 {
    let ck = dim_model::open_checkpoint(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    for name in ck.file().names() {
        let _ = ck.file().read(name).unwrap();
    }
    ck.model_config().unwrap();
    ck.meta("step").unwrap().parse().unwrap()
}

/// A small deterministic generator for the kill times (SplitMix64).
fn next(state: &mut u64) -> u64 {
    dim_rng::splitmix64(state)
}

#[test]
fn sigkill_twenty_times_then_resume_repeats_the_loss_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let reference = d.join("reference");
    let st = train(&config(d, &reference), &[]).status().unwrap();
    assert!(st.success());
    let want = losses(&reference);
    assert_eq!(want.len() as u64, STEPS);

    let run = d.join("killed");
    let cfg = config(d, &run);
    let mut state = 0x5eed_u64;
    let mut mid_write = 0;
    for i in 0..KILLS {
        let mut child = train(&cfg, &["--resume", "auto"])
            // Each tensor write pauses, so a checkpoint write takes long
            // enough to be killed in.
            .env("DIM_IO_TEST_WRITE_DELAY_MS", "2")
            .spawn()
            .unwrap();
        let start = Instant::now();
        // Left by the previous kill; the run removes them after its next write.
        let stale = temp_files(&run);
        // Odd rounds: kill at a random moment in the first 1.5 s (start-up
        // takes about 0.7 s, a step with its checkpoint 0.2 s). Even rounds:
        // kill as soon as a checkpoint's temporary file appears.
        let deadline = Duration::from_millis(200 + next(&mut state) % 1300);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            let writing = temp_files(&run).iter().any(|f| !stale.contains(f));
            if (i % 2 == 0 && writing) || (i % 2 == 1 && start.elapsed() >= deadline) {
                child.kill().unwrap(); // SIGKILL
                mid_write += usize::from(writing);
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "round {i} hangs"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        child.wait().unwrap();
        // The newest checkpoint (if any yet) is whole and readable.
        if let Some(p) = checkpoints(&run).last() {
            assert_intact(p);
        }
    }
    assert!(
        mid_write >= KILLS / 4,
        "only {mid_write} kills landed in a checkpoint write"
    );

    let out = train(&cfg, &["--resume", "auto"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(losses(&run), want, "the killed and resumed run diverged");
    assert_eq!(assert_intact(checkpoints(&run).last().unwrap()), STEPS);
    assert!(
        temp_files(&run).is_empty(),
        "temporary files left: {:?}",
        temp_files(&run)
    );
}

/// Limits the file size of the child (`RLIMIT_FSIZE`) with SIGXFSZ ignored:
/// writes past `bytes` fail with EFBIG, as on a full disk.
fn limit_file_size(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (signal, setrlimit).
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn a_full_disk_during_a_checkpoint_is_a_clear_error_and_keeps_the_last_one() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let first = d.join("first");
    let st = train(&config(d, &first), &["train.steps=2"])
        .status()
        .unwrap();
    assert!(st.success());
    let ck = checkpoints(&first).pop().unwrap();
    let size = std::fs::metadata(&ck).unwrap().len();
    let bytes = std::fs::read(&ck).unwrap();

    // A tmpfs with room for the checkpoint and a half when root may mount
    // one; otherwise a file-size limit gives the same write error.
    let mnt = d.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let room = (size * 3 / 2).div_ceil(4096) * 4096 + 16 * 4096;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={room}"), "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let out_dir = mnt.join("run");
    std::fs::create_dir(&out_dir).unwrap();
    let kept = out_dir.join(ck.file_name().unwrap());
    std::fs::copy(&ck, &kept).unwrap();
    std::fs::copy(first.join("metrics.jsonl"), out_dir.join("metrics.jsonl")).unwrap();

    let cfg = config(d, &out_dir);
    let mut cmd = train(&cfg, &["--resume", "auto", "train.steps=4"]);
    if !mounted {
        eprintln!("mount not permitted: simulating the full disk with RLIMIT_FSIZE");
        limit_file_size(&mut cmd, size / 2);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let survived = std::fs::read(&kept).ok();
    let leftovers = temp_files(&out_dir);
    let step = std::panic::catch_unwind(|| assert_intact(&kept));
    if mounted {
        let _ = Command::new("umount").arg(&mnt).status();
    }
    assert!(!out.status.success(), "training should fail: {stderr}");
    assert!(
        stderr.contains("cannot write checkpoint")
            && stderr.contains("ckpt-000000003")
            && (stderr.contains("No space left on device") || stderr.contains("File too large"))
            && stderr.contains("untouched"),
        "{stderr}"
    );
    assert_eq!(survived, Some(bytes), "the previous checkpoint changed");
    assert_eq!(step.ok(), Some(2));
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
