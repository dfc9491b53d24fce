//! The multi-threaded CPU implementation of the selective scan, forward and
//! backward, on plain slices (no libtorch). The autograd op calls it for CPU
//! tensors through [`ffi_forward`] / [`ffi_backward`].
//!
//! Work is split over (batch, channel) with rayon. The backward recomputes the
//! states: a first pass stores the state every [`SEGMENT`] positions, then each
//! segment is recomputed (keeping its states and decays) and walked backwards.
//! Reductions (over batch for `dA`, `dD`, `delta_bias`; over the channels of a
//! group for `dB`, `dC`) go through per-task partial sums added in a fixed
//! order, so results do not depend on the thread count: the CPU backward is
//! always deterministic.

use std::ffi::c_int;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::ffi;

/// Positions between stored states in the backward's first pass.
pub const SEGMENT: usize = 128;
/// Channels per backward task; also the granularity of the `dB`/`dC` partial sums.
const CHANNELS_PER_TASK: usize = 16;

/// An element type of `u`, `delta`, `z`, `B`, `C` and `y`; math is in f32.
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Sizes of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub dstate: usize,
    pub groups: usize,
}

impl Shape {
    fn per_group(&self) -> usize {
        self.dim / self.groups
    }
}

/// One direction's inputs, contiguous, with the layouts of the crate docs:
/// `u`, `delta`: `(batch, D, L)`; `a`: `(D, N)`; `b`, `c`: `(batch, G, N, L)`;
/// `d`, `delta_bias`: `(D)`.
#[derive(Clone, Copy, Debug)]
pub struct DirInputs<'a, E> {
    pub u: &'a [E],
    pub delta: &'a [E],
    pub a: &'a [f32],
    pub b: &'a [E],
    pub c: &'a [E],
    pub d: Option<&'a [f32]>,
    pub delta_bias: Option<&'a [f32]>,
    pub reverse: bool,
}

/// One direction's gradients, each written in full: shapes as the inputs.
#[derive(Debug)]
pub struct DirGrads<'a, E> {
    pub du: &'a mut [E],
    pub ddelta: &'a mut [E],
    pub da: &'a mut [f32],
    pub db: &'a mut [f32],
    pub dc: &'a mut [f32],
    pub dd: Option<&'a mut [f32]>,
    pub ddelta_bias: Option<&'a mut [f32]>,
}

/// `exp(x)` in f32 to about 2 ulp, written so that loops over the state
/// dimension vectorise (std's `exp` is a scalar libm call). e^x = 2^i · e^r
/// with i = round(x·log2 e) and r = x − i·ln 2 (ln 2 split in a high part
/// exact in f32 and a low part, so r keeps full precision for large |x|);
/// e^r, |r| ≤ 0.35, from its Taylor series to degree 7 (error below 6e-9).
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    // 0.693145751953125 exactly (few mantissa bits, so i·LN2_HI is exact) and ln 2 − LN2_HI.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding it rounds to an integer, which then sits in the low
    // mantissa bits (exact for |t| < 2^22). No float-to-int conversion, so the
    // loops over the state dimension vectorise.
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + SHIFTER;
    let i = t - SHIFTER;
    let r = (xc - i * LN2_HI) - i * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^i from the biased exponent i + 127 (in 1..=254 for the clamped range).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    // NaN in, NaN out (the clamp above would hide it).
    if x.is_nan() {
        x
    } else {
        p * scale
    }
}

/// Σ a·b with eight partial sums, so the loop vectorises (a plain running sum
/// is a serial dependency the compiler may not reorder).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ a, with eight partial sums (see [`dot`]).
#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for x in chunks {
        for k in 0..8 {
            acc[k] += x[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn softplus(x: f32) -> f32 {
    // Above 20, log1p(exp(x)) equals x in f32.
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `(batch, G, N, L)` -> f32 `(batch, G, L, N)`, so the state loop reads contiguously.
fn transpose_bc<E: Elem>(x: &[E], s: Shape) -> Vec<f32> {
    let (n, l) = (s.dstate, s.len);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n * l)
        .zip(x.par_chunks(n * l))
        .for_each(|(dst, src)| {
            for ni in 0..n {
                for li in 0..l {
                    dst[li * n + ni] = src[ni * l + li].to_f32();
                }
            }
        });
    out
}

/// One channel of one direction.
struct Channel<'a, E> {
    u: &'a [E],
    delta: &'a [E],
    a: &'a [f32],
    bt: &'a [f32],
    ct: &'a [f32],
    d: f32,
    bias: f32,
    softplus: bool,
    reverse: bool,
}

impl<'a, E: Elem> Channel<'a, E> {
    fn new(
        x: &DirInputs<'a, E>,
        s: Shape,
        softplus: bool,
        b: usize,
        d: usize,
        bt: &'a [f32],
        ct: &'a [f32],
    ) -> Self {
        let row = (b * s.dim + d) * s.len;
        let slab = (b * s.groups + d / s.per_group()) * s.len * s.dstate;
        let bc = slab..slab + s.len * s.dstate;
        Self {
            u: &x.u[row..row + s.len],
            delta: &x.delta[row..row + s.len],
            a: &x.a[d * s.dstate..(d + 1) * s.dstate],
            bt: &bt[bc.clone()],
            ct: &ct[bc],
            d: x.d.map_or(0.0, |v| v[d]),
            bias: x.delta_bias.map_or(0.0, |v| v[d]),
            softplus,
            reverse: x.reverse,
        }
    }

    fn len(&self) -> usize {
        self.u.len()
    }

    /// Position of the `i`-th step in scan order.
    fn pos(&self, i: usize) -> usize {
        if self.reverse {
            self.len() - 1 - i
        } else {
            i
        }
    }

    /// Δ at position `l` and dΔ/d(delta).
    fn dt(&self, l: usize) -> (f32, f32) {
        let x = self.delta[l].to_f32() + self.bias;
        if self.softplus {
            (softplus(x), sigmoid(x))
        } else {
            (x, 1.0)
        }
    }

    /// One recurrence step at position `l` from state `h`; returns Σ_n C·h.
    #[inline(always)]
    fn step(&self, l: usize, dt: f32, h: &mut [f32], decay: Option<&mut [f32]>) -> f32 {
        let n = h.len();
        let dtu = dt * self.u[l].to_f32();
        // Equal-length slices: no bounds checks, so the loops vectorise.
        let a = &self.a[..n];
        let b = &self.bt[l * n..(l + 1) * n];
        match decay {
            Some(decay) => {
                let decay = &mut decay[..n];
                for k in 0..n {
                    let e = fast_exp(dt * a[k]);
                    decay[k] = e;
                    h[k] = e * h[k] + dtu * b[k];
                }
            }
            None => {
                for k in 0..n {
                    h[k] = fast_exp(dt * a[k]) * h[k] + dtu * b[k];
                }
            }
        }
        dot(&self.ct[l * n..(l + 1) * n], h)
    }

    /// The whole scan: adds this direction's y (skip term included) to `y`
    /// and, if given, stores the state before every segment into `ckpt`.
    fn forward(&self, h: &mut [f32], y: &mut [f32], mut ckpt: Option<&mut [f32]>) {
        let n = h.len();
        h.fill(0.0);
        for i in 0..self.len() {
            if let Some(ck) = ckpt.as_deref_mut() {
                if i % SEGMENT == 0 {
                    let s = i / SEGMENT;
                    ck[s * n..(s + 1) * n].copy_from_slice(h);
                }
            }
            let l = self.pos(i);
            let (dt, _) = self.dt(l);
            y[l] += self.step(l, dt, h, None) + self.d * self.u[l].to_f32();
        }
    }
}

/// Per-channel outputs of a backward pass.
struct ChannelGrads<'a, E> {
    du: &'a mut [E],
    ddelta: &'a mut [E],
    da: &'a mut [f32],
    dd: &'a mut f32,
    dbias: &'a mut f32,
    /// `(L, N)` accumulators of this task's share of dB and dC.
    db: &'a mut [f32],
    dc: &'a mut [f32],
}

/// Scratch of one backward task, reused across its channels.
struct Scratch {
    hs: Vec<f32>,
    decay: Vec<f32>,
    dts: Vec<(f32, f32)>,
    carry: Vec<f32>,
    h: Vec<f32>,
    /// dA of the channel, accumulated in f64: sums run over up to millions of positions.
    da: Vec<f64>,
    /// Per-state terms of dΔ and du, summed after the vectorised loop.
    t_ddt: Vec<f32>,
    t_du: Vec<f32>,
}

impl<E: Elem> Channel<'_, E> {
    /// Walks the scan backwards given `ybar = dL/dy` of this direction and the
    /// states stored by [`Channel::forward`].
    fn backward(&self, ybar: &[f32], ckpt: &[f32], g: ChannelGrads<'_, E>, s: &mut Scratch) {
        let n = self.a.len();
        let len = self.len();
        let nseg = len.div_ceil(SEGMENT);
        s.carry.fill(0.0);
        s.da.fill(0.0);
        let (mut dd_sum, mut dbias_sum) = (0f64, 0f64);
        for seg in (0..nseg).rev() {
            let (i0, i1) = (seg * SEGMENT, ((seg + 1) * SEGMENT).min(len));
            // Recompute the segment's states and decays from its stored start.
            s.h.copy_from_slice(&ckpt[seg * n..(seg + 1) * n]);
            for i in i0..i1 {
                let k = i - i0;
                let l = self.pos(i);
                let dt = self.dt(l);
                s.dts[k] = dt;
                self.step(l, dt.0, &mut s.h, Some(&mut s.decay[k * n..(k + 1) * n]));
                s.hs[k * n..(k + 1) * n].copy_from_slice(&s.h);
            }
            for i in (i0..i1).rev() {
                let k = i - i0;
                let l = self.pos(i);
                let (dt, dsp) = s.dts[k];
                let yb = ybar[l];
                let u = self.u[l].to_f32();
                let b = &self.bt[l * n..(l + 1) * n];
                let c = &self.ct[l * n..(l + 1) * n];
                let hprev = if k == 0 {
                    &ckpt[seg * n..(seg + 1) * n]
                } else {
                    &s.hs[(k - 1) * n..k * n]
                };
                let h = &s.hs[k * n..(k + 1) * n];
                let decay = &s.decay[k * n..(k + 1) * n];
                let db = &mut g.db[l * n..(l + 1) * n];
                let dc = &mut g.dc[l * n..(l + 1) * n];
                let (a, carry, da) = (&self.a[..n], &mut s.carry[..n], &mut s.da[..n]);
                let (hprev, h, decay) = (&hprev[..n], &h[..n], &decay[..n]);
                let (t_ddt, t_du) = (&mut s.t_ddt[..n], &mut s.t_du[..n]);
                for j in 0..n {
                    // dL/dh_l: from y_l, plus what flows back from h_{l+1}.
                    let gj = yb * c[j] + carry[j];
                    dc[j] += yb * h[j];
                    let gdecay = gj * hprev[j] * decay[j]; // dL/d(Δ·A)
                    t_ddt[j] = gdecay * a[j] + gj * b[j] * u;
                    da[j] += f64::from(gdecay * dt);
                    db[j] += gj * dt * u;
                    t_du[j] = gj * b[j];
                    carry[j] = decay[j] * gj;
                }
                let ddt = sum(t_ddt);
                let du = dt * sum(t_du);
                g.du[l] = E::from_f32(du + self.d * yb);
                dd_sum += f64::from(yb * u);
                let dd = ddt * dsp;
                g.ddelta[l] = E::from_f32(dd);
                dbias_sum += f64::from(dd);
            }
        }
        for (out, v) in g.da.iter_mut().zip(&s.da) {
            *out = *v as f32;
        }
        *g.dd = dd_sum as f32;
        *g.dbias = dbias_sum as f32;
    }
}

fn silu(z: f32) -> f32 {
    z * sigmoid(z)
}

/// Forward: `y` `(batch, D, L)` = Σ_dirs scan(dir), gated by `silu(z)` if given.
pub fn forward<E: Elem>(
    s: Shape,
    dirs: &[DirInputs<'_, E>],
    z: Option<&[E]>,
    y: &mut [E],
    delta_softplus: bool,
) {
    let bcs: Vec<(Vec<f32>, Vec<f32>)> = dirs
        .iter()
        .map(|x| (transpose_bc(x.b, s), transpose_bc(x.c, s)))
        .collect();
    y.par_chunks_mut(s.len).enumerate().for_each_init(
        || (vec![0f32; s.dstate], vec![0f32; s.len]),
        |(h, acc), (row, y)| {
            let (b, d) = (row / s.dim, row % s.dim);
            acc.fill(0.0);
            for (x, (bt, ct)) in dirs.iter().zip(&bcs) {
                Channel::new(x, s, delta_softplus, b, d, bt, ct).forward(h, acc, None);
            }
            let zrow = z.map(|z| &z[row * s.len..(row + 1) * s.len]);
            for l in 0..s.len {
                let gate = zrow.map_or(1.0, |z| silu(z[l].to_f32()));
                y[l] = E::from_f32(acc[l] * gate);
            }
        },
    );
}

/// Splits `s` into consecutive pieces of the given lengths.
fn split_mut<T>(mut s: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for n in lens {
        let (head, tail) = s.split_at_mut(n);
        out.push(head);
        s = tail;
    }
    out
}

/// One backward task: channels `d0..d1` (one group) of batch `b`.
#[derive(Clone, Copy)]
struct Task {
    b: usize,
    d0: usize,
    d1: usize,
}

/// Backward: writes every gradient of every direction (and `dz` when `z` is given).
pub fn backward<E: Elem>(
    s: Shape,
    dirs: &[DirInputs<'_, E>],
    z: Option<&[E]>,
    dy: &[E],
    grads: &mut [DirGrads<'_, E>],
    dz: Option<&mut [E]>,
    delta_softplus: bool,
) {
    let (n, len, pg) = (s.dstate, s.len, s.per_group());
    let chunks = pg.div_ceil(CHANNELS_PER_TASK);
    let mut tasks = Vec::new();
    for b in 0..s.batch {
        for g in 0..s.groups {
            for c in 0..chunks {
                let d0 = g * pg + c * CHANNELS_PER_TASK;
                tasks.push(Task {
                    b,
                    d0,
                    d1: (d0 + CHANNELS_PER_TASK).min((g + 1) * pg),
                });
            }
        }
    }
    let bcs: Vec<(Vec<f32>, Vec<f32>)> = dirs
        .iter()
        .map(|x| (transpose_bc(x.b, s), transpose_bc(x.c, s)))
        .collect();
    let ndirs = dirs.len();
    // Per-task partial sums, in task order: (batch, D, N) for dA, (batch, D)
    // for dD and delta_bias, (batch, G, chunks, L, N) for dB and dC.
    let mut part_a = vec![0f32; ndirs * s.batch * s.dim * n];
    let mut part_d = vec![0f32; ndirs * s.batch * s.dim];
    let mut part_bias = vec![0f32; ndirs * s.batch * s.dim];
    let slab = len * n;
    let mut part_b = vec![0f32; ndirs * tasks.len() * slab];
    let mut part_c = vec![0f32; ndirs * tasks.len() * slab];

    // Carve every output into per-task pieces (tasks cover memory in order).
    let widths: Vec<usize> = tasks.iter().map(|t| t.d1 - t.d0).collect();
    let mut per_task: Vec<Vec<TaskDir<'_, E>>> = tasks.iter().map(|_| Vec::new()).collect();
    {
        let mut pa = part_a.chunks_mut(s.batch * s.dim * n);
        let mut pd = part_d.chunks_mut(s.batch * s.dim);
        let mut pbias = part_bias.chunks_mut(s.batch * s.dim);
        let mut pb = part_b.chunks_mut(tasks.len() * slab);
        let mut pc = part_c.chunks_mut(tasks.len() * slab);
        for gr in grads.iter_mut() {
            let du = split_mut(&mut gr.du[..], widths.iter().map(|w| w * len));
            let ddelta = split_mut(&mut gr.ddelta[..], widths.iter().map(|w| w * len));
            let da = split_mut(pa.next().unwrap(), widths.iter().map(|w| w * n));
            let dd = split_mut(pd.next().unwrap(), widths.iter().copied());
            let dbias = split_mut(pbias.next().unwrap(), widths.iter().copied());
            let db = split_mut(pb.next().unwrap(), widths.iter().map(|_| slab));
            let dc = split_mut(pc.next().unwrap(), widths.iter().map(|_| slab));
            let pieces = du
                .into_iter()
                .zip(ddelta)
                .zip(da)
                .zip(dd)
                .zip(dbias)
                .zip(db)
                .zip(dc);
            for (t, ((((((du, ddelta), da), dd), dbias), db), dc)) in pieces.enumerate() {
                per_task[t].push(TaskDir {
                    du,
                    ddelta,
                    da,
                    dd,
                    dbias,
                    db,
                    dc,
                });
            }
        }
    }
    let mut dz_pieces: Vec<Option<&mut [E]>> = match dz {
        Some(dz) => split_mut(dz, widths.iter().map(|w| w * len))
            .into_iter()
            .map(Some)
            .collect(),
        None => tasks.iter().map(|_| None).collect(),
    };

    let nseg = len.div_ceil(SEGMENT);
    tasks
        .par_iter()
        .zip(per_task.par_iter_mut())
        .zip(dz_pieces.par_iter_mut())
        .for_each(|((task, outs), dz)| {
            let mut scratch = Scratch {
                hs: vec![0f32; SEGMENT * n],
                decay: vec![0f32; SEGMENT * n],
                dts: vec![(0.0, 0.0); SEGMENT],
                carry: vec![0f32; n],
                h: vec![0f32; n],
                da: vec![0f64; n],
                t_ddt: vec![0f32; n],
                t_du: vec![0f32; n],
            };
            let mut ckpt = vec![0f32; ndirs * nseg * n];
            let mut ysum = vec![0f32; len];
            let mut ybar = vec![0f32; len];
            for (ci, d) in (task.d0..task.d1).enumerate() {
                let row = (task.b * s.dim + d) * len;
                let chans: Vec<Channel<'_, E>> = dirs
                    .iter()
                    .zip(&bcs)
                    .map(|(x, (bt, ct))| Channel::new(x, s, delta_softplus, task.b, d, bt, ct))
                    .collect();
                ysum.fill(0.0);
                for (k, ch) in chans.iter().enumerate() {
                    let ck = &mut ckpt[k * nseg * n..(k + 1) * nseg * n];
                    ch.forward(&mut scratch.h, &mut ysum, Some(ck));
                }
                let dyrow = &dy[row..row + len];
                match z {
                    Some(z) => {
                        let zrow = &z[row..row + len];
                        let dz = dz.as_deref_mut().expect("dz given with z");
                        for l in 0..len {
                            let (zl, g) = (zrow[l].to_f32(), dyrow[l].to_f32());
                            let sg = sigmoid(zl);
                            ybar[l] = g * zl * sg;
                            dz[ci * len + l] =
                                E::from_f32(g * ysum[l] * sg * (1.0 + zl * (1.0 - sg)));
                        }
                    }
                    None => {
                        for l in 0..len {
                            ybar[l] = dyrow[l].to_f32();
                        }
                    }
                }
                for (k, ch) in chans.iter().enumerate() {
                    let o = &mut outs[k];
                    let ck = &ckpt[k * nseg * n..(k + 1) * nseg * n];
                    let (dd, dbias) = (&mut o.dd[ci], &mut o.dbias[ci]);
                    ch.backward(
                        &ybar,
                        ck,
                        ChannelGrads {
                            du: &mut o.du[ci * len..(ci + 1) * len],
                            ddelta: &mut o.ddelta[ci * len..(ci + 1) * len],
                            da: &mut o.da[ci * n..(ci + 1) * n],
                            dd,
                            dbias,
                            db: &mut o.db[..],
                            dc: &mut o.dc[..],
                        },
                        &mut scratch,
                    );
                }
            }
        });
    drop(per_task);

    // Fixed-order reductions into the outputs.
    for (k, gr) in grads.iter_mut().enumerate() {
        let pa = &part_a[k * s.batch * s.dim * n..(k + 1) * s.batch * s.dim * n];
        for (i, v) in gr.da.iter_mut().enumerate() {
            *v = (0..s.batch).map(|b| pa[b * s.dim * n + i]).sum();
        }
        let sum_batch = |part: &[f32], out: &mut [f32]| {
            let part = &part[k * s.batch * s.dim..(k + 1) * s.batch * s.dim];
            for (d, v) in out.iter_mut().enumerate() {
                *v = (0..s.batch).map(|b| part[b * s.dim + d]).sum();
            }
        };
        if let Some(dd) = gr.dd.as_deref_mut() {
            sum_batch(&part_d, dd);
        }
        if let Some(dbias) = gr.ddelta_bias.as_deref_mut() {
            sum_batch(&part_bias, dbias);
        }
        let ntasks = tasks.len();
        for (part, out) in [(&part_b, &mut *gr.db), (&part_c, &mut *gr.dc)] {
            let part = &part[k * ntasks * slab..(k + 1) * ntasks * slab];
            // out (batch, G, N, L); part (batch, G, chunks, L, N).
            out.par_chunks_mut(n * len)
                .enumerate()
                .for_each(|(bg, out)| {
                    let first = bg * chunks;
                    for c in 0..chunks {
                        let src = &part[(first + c) * slab..(first + c + 1) * slab];
                        for l in 0..len {
                            for j in 0..n {
                                if c == 0 {
                                    out[j * len + l] = src[l * n + j];
                                } else {
                                    out[j * len + l] += src[l * n + j];
                                }
                            }
                        }
                    }
                });
        }
    }
}

/// A task's slices of one direction's outputs and partial sums.
struct TaskDir<'a, E> {
    du: &'a mut [E],
    ddelta: &'a mut [E],
    da: &'a mut [f32],
    dd: &'a mut [f32],
    dbias: &'a mut [f32],
    db: &'a mut [f32],
    dc: &'a mut [f32],
}

// ---- The C ABI entry points the autograd shim calls for CPU tensors. ----

/// Builds slices over the raw pointers of `p` and runs `f` for the dtype.
///
/// # Safety
/// `p` must describe valid, contiguous, non-overlapping CPU buffers of the
/// sizes its shape implies (the shim guarantees this).
unsafe fn with_views(p: &ffi::Params, is_backward: bool) {
    let s = Shape {
        batch: p.batch as usize,
        dim: p.dim as usize,
        len: p.seqlen as usize,
        dstate: p.dstate as usize,
        groups: p.ngroups as usize,
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        match p.dtype {
            ffi::DTYPE_F32 => run_typed::<f32>(p, s, is_backward),
            ffi::DTYPE_BF16 => run_typed::<bf16>(p, s, is_backward),
            ffi::DTYPE_F16 => run_typed::<f16>(p, s, is_backward),
            other => panic!("unknown dtype code {other}"),
        }
    }
}

/// # Safety
/// See [`with_views`].
unsafe fn run_typed<E: Elem>(p: &ffi::Params, s: Shape, is_backward: bool) {
    use std::slice::{from_raw_parts as view, from_raw_parts_mut as view_mut};
    let bdl = s.batch * s.dim * s.len;
    let bgnl = s.batch * s.groups * s.dstate * s.len;
    let dn = s.dim * s.dstate;
    let ndirs = p.ndirs as usize;
    // SAFETY: sizes follow the layouts of selective_scan.h; pointers are valid
    // for the call and outputs do not alias inputs.
    unsafe {
        let opt = |ptr: *const f32, n: usize| (!ptr.is_null()).then(|| view(ptr, n));
        let dirs: Vec<DirInputs<'_, E>> = p.dir[..ndirs]
            .iter()
            .map(|d| DirInputs {
                u: view(d.u as *const E, bdl),
                delta: view(d.delta as *const E, bdl),
                a: view(d.a, dn),
                b: view(d.b as *const E, bgnl),
                c: view(d.c as *const E, bgnl),
                d: opt(d.d, s.dim),
                delta_bias: opt(d.delta_bias, s.dim),
                reverse: d.reverse != 0,
            })
            .collect();
        let z = (!p.z.is_null()).then(|| view(p.z as *const E, bdl));
        let softplus = p.delta_softplus != 0;
        if !is_backward {
            forward(s, &dirs, z, view_mut(p.y as *mut E, bdl), softplus);
            return;
        }
        let optm = |ptr: *mut f32, n: usize| (!ptr.is_null()).then(|| view_mut(ptr, n));
        let mut grads: Vec<DirGrads<'_, E>> = p.grad[..ndirs]
            .iter()
            .map(|g| DirGrads {
                du: view_mut(g.du as *mut E, bdl),
                ddelta: view_mut(g.ddelta as *mut E, bdl),
                da: view_mut(g.da, dn),
                db: view_mut(g.db, bgnl),
                dc: view_mut(g.dc, bgnl),
                dd: optm(g.dd, s.dim),
                ddelta_bias: optm(g.ddelta_bias, s.dim),
            })
            .collect();
        let dz = (!p.dz.is_null()).then(|| view_mut(p.dz as *mut E, bdl));
        let dy = view(p.dy as *const E, bdl);
        backward(s, &dirs, z, dy, &mut grads, dz, softplus);
    }
}

fn ffi_entry(p: *const ffi::Params, backward: bool) -> c_int {
    let result = std::panic::catch_unwind(|| {
        // SAFETY: the shim passes a valid params struct over live CPU tensors.
        unsafe { with_views(&*p, backward) }
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            eprintln!("dim-scan CPU implementation failed: {msg}");
            1
        }
    }
}

pub(crate) extern "C" fn ffi_forward(p: *const ffi::Params) -> c_int {
    ffi_entry(p, false)
}

pub(crate) extern "C" fn ffi_backward(p: *const ffi::Params) -> c_int {
    ffi_entry(p, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std_across_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = fast_exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert!(fast_exp(f32::NAN).is_nan());
        assert!(fast_exp(-1000.0) < 1e-37); // clamped, tiny
        assert!(fast_exp(0.0) == 1.0);
    }

    #[test]
    fn softplus_and_sigmoid_agree_with_f64() {
        for &x in &[-30.0f32, -5.0, -0.3, 0.0, 0.7, 4.0, 19.9, 20.1, 50.0] {
            let want = (1.0 + (x as f64).exp()).ln();
            assert!((softplus(x) as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12);
            let sw = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid(x) as f64 - sw).abs() < 1e-7);
        }
    }
}
