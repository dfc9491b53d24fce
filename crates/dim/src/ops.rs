//! `dim ops`: single ops run from files, so that researchers can check them
//! against any other implementation.
//!
//! `dim ops scan --input in.safetensors --output out.safetensors [--device cpu|cuda]
//! [--bidirectional] [--no-softplus] [--deterministic]` reads the selective
//! scan's inputs by name (`u delta A B C D z delta_bias`, and with
//! `--bidirectional` also `u_b delta_b A_b B_b C_b D_b delta_bias_b`; absent
//! optional tensors mean "off"; an optional `dy`), runs the forward, and the
//! backward when `dy` is given, and writes `y` and each input's gradient as
//! `d<name>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use dim_scan::{
    backward_with_grad, selective_scan, selective_scan_bidirectional, Direction, ScanInputs,
    ScanOptions,
};
use tch::{Device, Tensor};

#[derive(Args, Debug)]
pub struct OpsArgs {
    #[command(subcommand)]
    pub op: OpsCommand,
}

#[derive(Subcommand, Debug)]
pub enum OpsCommand {
    /// The selective scan (one direction, or fused bidirectional) from a safetensors file.
    Scan(ScanArgs),
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// Input tensors by name: u delta A B C [D z delta_bias dy] (+ *_b with --bidirectional).
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write y and the gradients d<name>.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Fused bidirectional scan: the *_b tensors run in reverse.
    #[arg(long)]
    pub bidirectional: bool,
    /// Run the single direction from l = L-1 down to 0.
    #[arg(long, conflicts_with = "bidirectional")]
    pub reverse: bool,
    /// Use delta as given instead of softplus(delta + delta_bias).
    #[arg(long)]
    pub no_softplus: bool,
    /// Backward without floating-point atomics (bit-identical gradients).
    #[arg(long)]
    pub deterministic: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

pub fn run(args: OpsArgs) -> Result<()> {
    match args.op {
        OpsCommand::Scan(a) => scan(&a),
    }
}

const DIR_NAMES: [&str; 7] = ["u", "delta", "A", "B", "C", "D", "delta_bias"];
const REQUIRED: [&str; 5] = ["u", "delta", "A", "B", "C"];

fn scan(args: &ScanArgs) -> Result<()> {
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        DeviceArg::Cuda => bail!("--device cuda was given, but libtorch sees no CUDA device"),
    };
    let file = args.input.display();
    let loaded = Tensor::read_safetensors(&args.input)
        .map_err(|e| anyhow!("{file}: cannot read as safetensors: {e}"))?;
    let ndirs = if args.bidirectional { 2 } else { 1 };
    let mut allowed: Vec<String> = vec!["z".into(), "dy".into()];
    for k in 0..ndirs {
        allowed.extend(DIR_NAMES.iter().map(|n| name(n, k)));
    }
    let mut tensors = BTreeMap::new();
    for (n, t) in loaded {
        if !allowed.contains(&n) {
            bail!(
                "{file}: unexpected tensor `{n}`; expected some of: {}{}",
                allowed.join(" "),
                if n.ends_with("_b") && !args.bidirectional {
                    " (the *_b tensors need --bidirectional)"
                } else {
                    ""
                }
            );
        }
        tensors.insert(n, t.to_device(device));
    }
    for k in 0..ndirs {
        for n in REQUIRED {
            let n = name(n, k);
            if !tensors.contains_key(&n) {
                bail!("{file}: missing the required tensor `{n}`");
            }
        }
    }
    let want_grad = tensors.contains_key("dy");
    let leaves: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter(|(n, _)| n.as_str() != "dy")
        .map(|(n, t)| {
            (
                n.clone(),
                t.detach()
                    .set_requires_grad(want_grad && t.is_floating_point()),
            )
        })
        .collect();
    let get = |n: &str| leaves.get(n);
    let inputs = |k: usize| -> ScanInputs<'_> {
        let req = |n: &str| get(&name(n, k)).expect("checked above");
        ScanInputs {
            u: req("u"),
            delta: req("delta"),
            a: req("A"),
            b: req("B"),
            c: req("C"),
            d: get(&name("D", k)),
            delta_bias: get(&name("delta_bias", k)),
        }
    };
    let opts = ScanOptions {
        delta_softplus: !args.no_softplus,
        deterministic: args.deterministic,
    };
    let z = get("z");
    let result = if args.bidirectional {
        selective_scan_bidirectional(inputs(0), inputs(1), z, opts)
    } else {
        let dir = if args.reverse {
            Direction::Reverse
        } else {
            Direction::Forward
        };
        selective_scan(inputs(0), dir, z, opts)
    };
    let y = result.with_context(|| format!("{file}: the inputs do not fit the scan"))?;
    let mut out: Vec<(String, Tensor)> = vec![("y".into(), y.detach().to_device(Device::Cpu))];
    if let Some(dy) = tensors.get("dy") {
        backward_with_grad(&y, dy).with_context(|| format!("{file}: backward with `dy`"))?;
        for (n, t) in &leaves {
            let g = t.grad();
            if g.defined() {
                out.push((format!("d{n}"), g.to_device(Device::Cpu)));
            }
        }
    }
    write_atomically(&args.output, &out)?;
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    println!("wrote {} to {}", names.join(" "), args.output.display());
    Ok(())
}

/// A direction's tensor name: `u` for the first, `u_b` for the reverse one.
fn name(base: &str, dir: usize) -> String {
    if dir == 0 {
        base.to_string()
    } else {
        format!("{base}_b")
    }
}

/// Writes next to `path`, then renames, so a failure never leaves half a file.
fn write_atomically(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, &tmp)
        .map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move the result to {}", path.display()))
}
