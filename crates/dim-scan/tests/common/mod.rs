//! Shared by the CPU and GPU tests: random problems, running the op with
//! gradients, and comparing against the f64 reference.
#![allow(dead_code)]

use dim_scan::reference::{selective_scan_bidirectional_ref, selective_scan_ref};
use dim_scan::{selective_scan, selective_scan_bidirectional, Direction, ScanInputs, ScanOptions};
use tch::{Device, Kind, Tensor};

/// What a test case varies.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub batch: i64,
    pub dim: i64,
    pub len: i64,
    pub dstate: i64,
    pub groups: i64,
    /// `None`: fused bidirectional.
    pub direction: Option<Direction>,
    pub z: bool,
    pub d: bool,
    pub bias: bool,
    pub softplus: bool,
}

impl Case {
    pub fn new(batch: i64, dim: i64, len: i64) -> Self {
        Self {
            batch,
            dim,
            len,
            dstate: 16,
            groups: 1,
            direction: None,
            z: true,
            d: true,
            bias: true,
            softplus: true,
        }
    }
}

/// `base` with each optional part off in turn (`z`, `D`, `delta_bias`,
/// softplus), then all off, each reversed and fused bidirectional.
pub fn with_parts_off(base: Case) -> Vec<Case> {
    let mut out = Vec::new();
    for (z, d, bias, softplus) in [
        (false, true, true, true),
        (true, false, true, true),
        (true, true, false, true),
        (true, true, true, false),
        (false, false, false, false),
    ] {
        for direction in [Some(Direction::Reverse), None] {
            out.push(Case {
                direction,
                z,
                d,
                bias,
                softplus,
                ..base
            });
        }
    }
    out
}

/// `base` in each direction: forward, reverse and fused bidirectional.
pub fn every_direction(base: Case) -> Vec<Case> {
    [Some(Direction::Forward), Some(Direction::Reverse), None]
        .into_iter()
        .map(|direction| Case { direction, ..base })
        .collect()
}

/// A fresh seed per run (printed, so a failure can be replayed with DIM_TEST_SEED).
pub fn seed() -> i64 {
    let seed = std::env::var("DIM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as i64
        });
    println!("seed {seed} (replay with DIM_TEST_SEED={seed})");
    seed
}

/// One direction's tensors in f64 on the CPU (the masters every run casts from).
pub struct DirTensors {
    pub u: Tensor,
    pub delta: Tensor,
    pub a: Tensor,
    pub b: Tensor,
    pub c: Tensor,
    pub d: Option<Tensor>,
    pub bias: Option<Tensor>,
}

impl DirTensors {
    /// u, delta, A, B, C, D, delta_bias (None where absent): the data
    /// tensors (u, delta, B, C) through `data`, the parameters through `param`.
    fn each(
        &self,
        data: impl Fn(&Tensor) -> Tensor,
        param: impl Fn(&Tensor) -> Tensor,
    ) -> Vec<Option<Tensor>> {
        vec![
            Some(data(&self.u)),
            Some(data(&self.delta)),
            Some(param(&self.a)),
            Some(data(&self.b)),
            Some(data(&self.c)),
            self.d.as_ref().map(&param),
            self.bias.as_ref().map(&param),
        ]
    }
}

pub struct Problem {
    pub case: Case,
    pub dirs: Vec<DirTensors>,
    pub z: Option<Tensor>,
    /// Weights of the scalar loss sum(y * w), i.e. dy.
    pub w: Tensor,
}

impl Problem {
    pub fn random(case: Case) -> Self {
        let opts = (Kind::Double, Device::Cpu);
        let (bt, d, l, n, g) = (case.batch, case.dim, case.len, case.dstate, case.groups);
        let ndirs = if case.direction.is_some() { 1 } else { 2 };
        let dirs = (0..ndirs)
            .map(|_| DirTensors {
                u: Tensor::randn([bt, d, l], opts),
                // Pre-softplus values around -1 give Δ ≈ 0.3; without softplus Δ must be > 0.
                delta: if case.softplus {
                    Tensor::randn([bt, d, l], opts) * 0.5 - 1.0
                } else {
                    Tensor::rand([bt, d, l], opts) * 0.5 + 0.01
                },
                a: -(Tensor::rand([d, n], opts) * 1.5 + 0.5),
                b: Tensor::randn([bt, g, n, l], opts),
                c: Tensor::randn([bt, g, n, l], opts),
                d: case.d.then(|| Tensor::randn([d], opts)),
                // Without softplus, Δ = delta + bias must stay positive (else the state grows without bound).
                bias: case.bias.then(|| {
                    if case.softplus {
                        Tensor::randn([d], opts) * 0.5
                    } else {
                        Tensor::rand([d], opts) * 0.05
                    }
                }),
            })
            .collect();
        Self {
            case,
            dirs,
            z: case.z.then(|| Tensor::randn([bt, d, l], opts)),
            w: Tensor::randn([bt, d, l], opts),
        }
    }
}

impl Problem {
    /// The same problem with every tensor rounded through the dtypes the op
    /// computes from (`kind` for data, f32 for A, D, delta_bias), so that a
    /// reference on it measures the op's own error, not the input rounding.
    pub fn rounded_to(&self, kind: Kind) -> Self {
        let r = |t: &Tensor, k: Kind| t.to_kind(k).to_kind(Kind::Double);
        Self {
            case: self.case,
            dirs: self
                .dirs
                .iter()
                .map(|x| DirTensors {
                    u: r(&x.u, kind),
                    delta: r(&x.delta, kind),
                    a: r(&x.a, Kind::Float),
                    b: r(&x.b, kind),
                    c: r(&x.c, kind),
                    d: x.d.as_ref().map(|t| r(t, Kind::Float)),
                    bias: x.bias.as_ref().map(|t| r(t, Kind::Float)),
                })
                .collect(),
            z: self.z.as_ref().map(|t| r(t, kind)),
            w: r(&self.w, kind),
        }
    }
}

/// The op's output and the gradient of every input (None where absent), in f64.
pub struct Outcome {
    pub y: Tensor,
    /// Per direction: u, delta, A, B, C, D, delta_bias.
    pub grads: Vec<Vec<Option<Tensor>>>,
    pub dz: Option<Tensor>,
}

pub const NAMES: [&str; 7] = ["u", "delta", "A", "B", "C", "D", "delta_bias"];

/// Runs `y = op(inputs)` and `sum(y * w).backward()` with the data tensors in
/// `kind` on `device` (A, D, delta_bias stay f32 for the op, f64 for the
/// reference).
pub fn run(
    p: &Problem,
    kind: Kind,
    device: Device,
    reference: bool,
    deterministic: bool,
) -> Outcome {
    let param_kind = if reference { Kind::Double } else { Kind::Float };
    let leaf = |t: &Tensor, k: Kind| {
        t.detach()
            .to_kind(k)
            .to_device(device)
            .set_requires_grad(true)
    };
    let dirs: Vec<Vec<Option<Tensor>>> = p
        .dirs
        .iter()
        .map(|x| x.each(|t| leaf(t, kind), |t| leaf(t, param_kind)))
        .collect();
    let z = p.z.as_ref().map(|t| leaf(t, kind));
    let softplus = p.case.softplus;
    let opts = ScanOptions {
        delta_softplus: softplus,
        deterministic,
    };
    let y = match (p.case.direction, reference) {
        (Some(dir), true) => selective_scan_ref(inputs(&dirs[0]), dir, z.as_ref(), softplus),
        (Some(dir), false) => selective_scan(inputs(&dirs[0]), dir, z.as_ref(), opts).unwrap(),
        (None, true) => selective_scan_bidirectional_ref(
            inputs(&dirs[0]),
            inputs(&dirs[1]),
            z.as_ref(),
            softplus,
        ),
        (None, false) => {
            selective_scan_bidirectional(inputs(&dirs[0]), inputs(&dirs[1]), z.as_ref(), opts)
                .unwrap()
        }
    };
    assert_eq!(y.kind(), kind, "y has the input dtype");
    (&y * p.w.to_kind(kind).to_device(device))
        .sum(Kind::Double)
        .backward();
    let grad = |t: &Tensor| t.grad().to_device(Device::Cpu).to_kind(Kind::Double);
    Outcome {
        y: y.detach().to_device(Device::Cpu).to_kind(Kind::Double),
        grads: dirs
            .iter()
            .map(|v| v.iter().map(|t| t.as_ref().map(grad)).collect())
            .collect(),
        dz: z.as_ref().map(grad),
    }
}

/// The op's forward alone (for runs under `tch::no_grad`): y on `device`.
pub fn forward_only(p: &Problem, kind: Kind, device: Device) -> Tensor {
    let cast = |t: &Tensor, k: Kind| t.to_kind(k).to_device(device);
    let dirs: Vec<Vec<Option<Tensor>>> = p
        .dirs
        .iter()
        .map(|x| x.each(|t| cast(t, kind), |t| cast(t, Kind::Float)))
        .collect();
    let z = p.z.as_ref().map(|t| cast(t, kind));
    let opts = ScanOptions {
        delta_softplus: p.case.softplus,
        deterministic: false,
    };
    let y = match p.case.direction {
        Some(dir) => selective_scan(inputs(&dirs[0]), dir, z.as_ref(), opts).unwrap(),
        None => selective_scan_bidirectional(inputs(&dirs[0]), inputs(&dirs[1]), z.as_ref(), opts)
            .unwrap(),
    };
    y.to_device(Device::Cpu).to_kind(Kind::Double)
}

fn inputs(v: &[Option<Tensor>]) -> ScanInputs<'_> {
    ScanInputs {
        u: v[0].as_ref().unwrap(),
        delta: v[1].as_ref().unwrap(),
        a: v[2].as_ref().unwrap(),
        b: v[3].as_ref().unwrap(),
        c: v[4].as_ref().unwrap(),
        d: v[5].as_ref(),
        delta_bias: v[6].as_ref(),
    }
}

/// ‖a − b‖ / ‖b‖ (absolute when ‖b‖ is 0); NaN anywhere gives infinity.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).norm().double_value(&[]);
    let base = b.norm().double_value(&[]);
    let e = if base > 0.0 { diff / base } else { diff };
    if e.is_nan() || a.isnan().any().int64_value(&[]) != 0 {
        f64::INFINITY
    } else {
        e
    }
}

/// Runs the deterministic backward of `p` twice and asserts that every
/// gradient, `dz` included, is bit for bit the same.
pub fn assert_backward_bit_identical(what: &str, p: &Problem, kind: Kind, device: Device) {
    let first = run(p, kind, device, false, true);
    let second = run(p, kind, device, false, true);
    let grads = |o: &Outcome| -> Vec<Tensor> {
        o.grads
            .iter()
            .flatten()
            .flatten()
            .chain(o.dz.as_ref())
            .map(Tensor::shallow_clone)
            .collect()
    };
    let (a, b) = (grads(&first), grads(&second));
    assert_eq!(a.len(), b.len(), "{what}: different gradients present");
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(
            a.equal(b),
            "{what}: gradient {i} differs between two identical runs"
        );
    }
}

/// Asserts that every output and gradient of `got` is within `tol` of `want`.
pub fn assert_close(what: &str, got: &Outcome, want: &Outcome, tol: f64) {
    let mut report = Vec::new();
    let mut check = |name: String, g: &Tensor, w: &Tensor| {
        assert_eq!(g.size(), w.size(), "{what}: {name} shape");
        let e = rel_err(g, w);
        report.push(format!("{name}={e:.1e}"));
        assert!(
            e < tol,
            "{what}: {name} relative error {e:.3e} >= {tol:e} ({report:?})"
        );
    };
    check("y".into(), &got.y, &want.y);
    for (k, (gd, wd)) in got.grads.iter().zip(&want.grads).enumerate() {
        for (i, (g, w)) in gd.iter().zip(wd).enumerate() {
            match (g, w) {
                (Some(g), Some(w)) => check(format!("d{}[dir {k}]", NAMES[i]), g, w),
                (None, None) => {}
                _ => panic!("{what}: d{} present in one result only", NAMES[i]),
            }
        }
    }
    if let (Some(g), Some(w)) = (&got.dz, &want.dz) {
        check("dz".into(), g, w);
    }
    println!("{what}: {}", report.join(" "));
}
