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
//!
//! `dim ops vae encode|decode --weights vae.safetensors --input in.safetensors
//! --output out.safetensors [--config config.json] [--device cpu|cuda]
//! [--bf16]`: encode reads `images` `(N, 3, H, W)` f32 in `[-1, 1]` and
//! writes the posterior's `mean` and `logvar`; decode reads `latents` and
//! writes `images`. Both raw: no scale factor.
//!
//! `dim ops inception --weights inception.safetensors --input images.safetensors
//! --output features.safetensors [--device cpu|cuda]` reads `images`
//! `(N, 3, H, W)` f32 in `[0, 1]`, resizes to 299² and normalises as
//! pytorch-fid does, and writes `pool` `(N, 2048)`, `spatial` `(N, 2023)` (the
//! ADM evaluator's sFID features) and, when the weights have the `fc` head,
//! `logits` `(N, 1008)`.

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
    ///
    /// Reads u delta A B C [D z delta_bias dy] (and the *_b tensors with
    /// --bidirectional); writes y and, when dy is given, the gradients d<name>.
    Scan(ScanArgs),
    /// The SD VAE (AutoencoderKL): encode images or decode latents.
    ///
    /// Encode reads `images` (N, 3, H, W) f32 in [-1, 1] and writes `mean` and
    /// `logvar`; decode reads `latents` and writes `images`. Both raw: no
    /// scale factor.
    Vae(VaeArgs),
    /// Inception-v3 FID features (pool, spatial, logits) of images.
    ///
    /// Reads `images` (N, 3, H, W) f32 in [0, 1]; writes `pool` (N, 2048),
    /// `spatial` (N, 2023) and, with the fc head, `logits` (N, 1008).
    Inception(InceptionArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum VaeOp {
    /// `images` → `mean`, `logvar`.
    Encode,
    /// `latents` → `images`.
    Decode,
}

// Where every op reads its inputs, writes its outputs and runs (plain
// comments on these argument structs: a doc comment would replace the
// subcommand's help text).
#[derive(Args, Debug)]
pub struct OpFiles {
    /// The op's input tensors by name (safetensors; `--help` lists them).
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the op's output tensors (safetensors; written whole or not at all).
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

#[derive(Args, Debug)]
pub struct VaeArgs {
    #[arg(value_enum)]
    pub op: VaeOp,
    /// diffusers-format AutoencoderKL weights (safetensors).
    #[arg(long)]
    pub weights: PathBuf,
    /// A diffusers `config.json` for the architecture (default: the SD VAE).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub files: OpFiles,
    /// Run in bf16 (outputs are still written as f32).
    #[arg(long)]
    pub bf16: bool,
    /// Images per VAE call.
    #[arg(long, default_value_t = 8)]
    pub slice: i64,
}

#[derive(Args, Debug)]
pub struct InceptionArgs {
    /// Inception-v3 FID weights (safetensors, PyTorch names; see docs/eval.md).
    #[arg(long)]
    pub weights: PathBuf,
    #[command(flatten)]
    pub files: OpFiles,
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    #[command(flatten)]
    pub files: OpFiles,
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
        OpsCommand::Vae(a) => vae(&a),
        OpsCommand::Inception(a) => inception(&a),
    }
}

fn device_of(d: DeviceArg) -> Result<Device> {
    match d {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceArg::Cuda => bail!("--device cuda was given, but libtorch sees no CUDA device"),
    }
}

/// The tensors of an op's input file, by name.
struct Inputs {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl Inputs {
    fn open(path: &Path) -> Result<Self> {
        let tensors = dim_io::read_all(path)?.into_iter().collect();
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// The error for a missing tensor `name` (`what` it should be), naming
    /// the file and what it holds.
    fn missing(&self, name: &str, what: &str) -> anyhow::Error {
        let names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        anyhow!(
            "{}: no tensor `{name}` ({what}); it holds: {}",
            self.path.display(),
            names.join(" ")
        )
    }

    /// Takes the tensor `name` (`what` it should be, for the error), as f32.
    fn take_float(&mut self, name: &str, what: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| self.missing(name, what))?;
        if !t.is_floating_point() {
            bail!(
                "{}: `{name}` must be floating point, got {:?}",
                self.path.display(),
                t.kind()
            );
        }
        Ok(t.to_kind(tch::Kind::Float))
    }
}

/// Writes an op's outputs to `path` (whole or not at all) and says which.
fn write_outputs(path: &Path, out: &[(String, Tensor)]) -> Result<()> {
    dim_io::save(
        path,
        out.iter().map(|(n, t)| (n.clone(), t.shallow_clone())),
        &Default::default(),
    )?;
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    println!("wrote {} to {}", names.join(" "), path.display());
    Ok(())
}

fn vae(a: &VaeArgs) -> Result<()> {
    let device = device_of(a.files.device)?;
    let cfg = match &a.config {
        Some(p) => dim_vae::VaeConfig::from_diffusers_json(p)?,
        None => dim_vae::VaeConfig::default(),
    };
    let mut net = dim_vae::AutoencoderKL::load(&cfg, &a.weights, device)?.with_slice(a.slice);
    if a.bf16 {
        net = net.to_kind(tch::Kind::BFloat16);
    }
    let mut inputs = Inputs::open(&a.files.input)?;
    let file = a.files.input.display();
    let out: Vec<(String, Tensor)> = match a.op {
        VaeOp::Encode => {
            let x = inputs.take_float("images", "(N, 3, H, W) f32 in [-1, 1]")?;
            let post = net
                .encode(&x)
                .with_context(|| format!("{file}: `images`"))?;
            vec![
                ("mean".into(), post.mean.to_device(Device::Cpu)),
                ("logvar".into(), post.logvar.to_device(Device::Cpu)),
            ]
        }
        VaeOp::Decode => {
            let z = inputs.take_float("latents", "(N, 4, h, w) raw latents, no scale factor")?;
            let x = net
                .decode(&z)
                .with_context(|| format!("{file}: `latents`"))?;
            vec![("images".into(), x.to_device(Device::Cpu))]
        }
    };
    write_outputs(&a.files.output, &out)
}

fn inception(a: &InceptionArgs) -> Result<()> {
    let device = device_of(a.files.device)?;
    let net = dim_eval::InceptionV3::load(&a.weights, device)?;
    let x = Inputs::open(&a.files.input)?.take_float("images", "(N, 3, H, W) f32 in [0, 1]")?;
    let f = net
        .all_features(&(x * 2.0 - 1.0))
        .with_context(|| format!("{}: `images`", a.files.input.display()))?;
    let mut out: Vec<(String, Tensor)> = vec![
        ("pool".into(), f.pool.to_device(Device::Cpu)),
        ("spatial".into(), f.spatial.to_device(Device::Cpu)),
    ];
    if let Some(l) = f.logits {
        out.push(("logits".into(), l.to_device(Device::Cpu)));
    }
    write_outputs(&a.files.output, &out)
}

const DIR_NAMES: [&str; 7] = ["u", "delta", "A", "B", "C", "D", "delta_bias"];
const REQUIRED: [&str; 5] = ["u", "delta", "A", "B", "C"];

fn scan(args: &ScanArgs) -> Result<()> {
    let device = device_of(args.files.device)?;
    let file = args.files.input.display();
    let loaded = Inputs::open(&args.files.input)?;
    let ndirs = if args.bidirectional { 2 } else { 1 };
    let mut allowed: Vec<String> = vec!["z".into(), "dy".into()];
    for k in 0..ndirs {
        allowed.extend(DIR_NAMES.iter().map(|n| name(n, k)));
    }
    for n in loaded.tensors.keys() {
        if !allowed.contains(n) {
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
    }
    for k in 0..ndirs {
        for n in REQUIRED {
            let n = name(n, k);
            if !loaded.tensors.contains_key(&n) {
                return Err(loaded.missing(&n, "required"));
            }
        }
    }
    let tensors: BTreeMap<String, Tensor> = loaded
        .tensors
        .into_iter()
        .map(|(n, t)| (n, t.to_device(device)))
        .collect();
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
    write_outputs(&args.files.output, &out)
}

/// A direction's tensor name: `u` for the first, `u_b` for the reverse one.
fn name(base: &str, dir: usize) -> String {
    if dir == 0 {
        base.to_string()
    } else {
        format!("{base}_b")
    }
}
