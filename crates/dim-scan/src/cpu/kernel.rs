//! The scan's loops, generic over the element type `E` and over how
//! `a·b + c` is evaluated (`M`), written once: a task is one block of
//! [`LANES`] channels of one batch element; [`forward_task`] and
//! [`backward_task`] run a task's directions (the backward recomputing states
//! from checkpoints every [`SEGMENT`] positions). `dispatch` compiles them per
//! instruction set. Uses `types`, `simd` and `math`.

use rayon::prelude::*;

use super::math::{exp, logistic, silu, softplus_sigmoid, MulAdd, Real};
use super::simd::{Lanes, Lanes64, LANES, ZERO, ZERO64};
use super::types::{DirInputs, Elem, Shape};

/// Positions between stored states in the backward's first pass.
pub const SEGMENT: usize = 128;
/// Positions whose Δ and `u` are prepared at once (a multiple of
/// [`SEGMENT`]): long contiguous reads of the input rows, and up to this
/// length one preparation serves both the backward's forward pass and its walk.
const CHUNK: usize = 8 * SEGMENT;

/// `(batch, G, N, L)` -> f32 `(batch, G, L, N)`, so that a position's `B_l`, `C_l` are contiguous.
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

/// One task: channels `d0..d1` (at most [`LANES`], one group) of batch `b`.
#[derive(Clone, Copy)]
pub(super) struct Task {
    pub(super) b: usize,
    pub(super) d0: usize,
    pub(super) d1: usize,
}

impl Task {
    pub(super) fn width(&self) -> usize {
        self.d1 - self.d0
    }
}

/// The tasks of a call in memory order of `(batch, D, ·)` rows.
pub(super) fn tasks(s: Shape) -> Vec<Task> {
    let pg = s.per_group();
    let mut tasks = Vec::new();
    for b in 0..s.batch {
        for g in 0..s.groups {
            for d0 in (g * pg..(g + 1) * pg).step_by(LANES) {
                tasks.push(Task {
                    b,
                    d0,
                    d1: (d0 + LANES).min((g + 1) * pg),
                });
            }
        }
    }
    tasks
}

/// What every task of a call reads.
pub(super) struct Ctx<'a, E> {
    pub(super) s: Shape,
    pub(super) dirs: &'a [DirInputs<'a, E>],
    /// Per direction, `B` and `C` as `(batch, G, L, N)` f32.
    pub(super) bcs: &'a [(Vec<f32>, Vec<f32>)],
    pub(super) z: Option<&'a [E]>,
    pub(super) softplus: bool,
}

/// One chunk's inputs in lane layout, by position from the chunk's first.
struct Prep {
    /// Δ, dΔ/d(delta) (for the backward) and `u`.
    dt: Vec<Lanes>,
    dsp: Vec<Lanes>,
    u: Vec<Lanes>,
    /// The chunk held (scan order), and whether `dsp` is filled.
    held: Option<(usize, bool)>,
}

impl Prep {
    fn new(len: usize) -> Self {
        let k = len.min(CHUNK);
        Self {
            dt: vec![ZERO; k],
            dsp: vec![ZERO; k],
            u: vec![ZERO; k],
            held: None,
        }
    }
}

/// `delta + bias` and `u` of a chunk as f32 rows `(LANES, CHUNK)`: converted
/// by contiguous loops, then gathered into lanes. Rows are padded by a cache
/// line: 4 KiB apart, the sixteen loads of a gather would all fall in one
/// cache set.
struct Rows {
    x: Box<[[f32; ROW]; LANES]>,
    u: Box<[[f32; ROW]; LANES]>,
}

impl Rows {
    fn new() -> Self {
        // Through a Vec: no 66 KB temporary on the stack.
        let rows = || -> Box<[[f32; ROW]; LANES]> {
            vec![[0.0; ROW]; LANES]
                .into_boxed_slice()
                .try_into()
                .expect("LANES rows")
        };
        Self {
            x: rows(),
            u: rows(),
        }
    }
}

/// A [`Rows`] row: a chunk plus a cache line.
const ROW: usize = CHUNK + 16;

/// A segment's slices of a [`Prep`].
#[derive(Clone, Copy)]
struct Seg<'a> {
    dt: &'a [Lanes],
    dsp: &'a [Lanes],
    u: &'a [Lanes],
}

/// Scratch of one thread, reused across its tasks.
pub(super) struct Scratch {
    /// One per direction in the backward (each keeps its last chunk for the
    /// walk), one in the forward.
    preps: Vec<Prep>,
    rows: Rows,
    /// The running state, `N` lane-vectors.
    h: Vec<Lanes>,
    /// Per position: y summed over the directions; in the backward, then
    /// dL/dy of that sum.
    acc: Vec<Lanes>,
    /// One channel's row of `L`.
    row: Vec<f32>,
    // Backward only (empty in the forward):
    /// Per direction: the state before every segment, `(dirs, segments, N)`,
    /// and one segment's states and decays, `(dirs, SEGMENT, N)`.
    ckpt: Vec<Lanes>,
    hs: Vec<Lanes>,
    decay: Vec<Lanes>,
    walk: Walk,
}

/// The backward walk's running sums and staged outputs.
struct Walk {
    /// dL/dh flowing back from the next position.
    carry: Vec<Lanes>,
    /// dA of the block, accumulated in f64: sums run over up to millions of positions.
    da: Vec<Lanes64>,
    /// du and d(delta) of the segment, in lane layout, for the row-layout outputs.
    du: Vec<Lanes>,
    dd: Vec<Lanes>,
    /// One position's per-lane terms of dB and dC, to be summed over the lanes.
    pb: Vec<Lanes>,
    pc: Vec<Lanes>,
}

impl Scratch {
    pub(super) fn new(s: Shape, ndirs: usize, backward: bool) -> Self {
        let (n, len) = (s.dstate, s.len);
        let bw = |k: usize| if backward { vec![ZERO; k] } else { Vec::new() };
        Self {
            preps: (0..if backward { ndirs } else { 1 })
                .map(|_| Prep::new(len))
                .collect(),
            rows: Rows::new(),
            h: vec![ZERO; n],
            acc: vec![ZERO; len],
            row: vec![0.0; len],
            ckpt: bw(ndirs * len.div_ceil(SEGMENT) * n),
            hs: bw(ndirs * SEGMENT * n),
            decay: bw(ndirs * SEGMENT * n),
            walk: Walk {
                carry: bw(n),
                da: if backward {
                    vec![ZERO64; n]
                } else {
                    Vec::new()
                },
                du: bw(SEGMENT),
                dd: bw(SEGMENT),
                pb: bw(n),
                pc: bw(n),
            },
        }
    }
}

/// One direction over one task's block of channels. Lanes past `width` are
/// padding: zero `u`, `A`, `D`, so their state, output and gradients stay zero.
struct Block<'a, E> {
    /// The block's rows `(width, L)`.
    u: &'a [E],
    delta: &'a [E],
    /// `A[d, n]` as `N` lane-vectors.
    a: Vec<Lanes>,
    d: Lanes,
    bias: Lanes,
    /// The group's `B`, `C` as `(L, N)`.
    bt: &'a [f32],
    ct: &'a [f32],
    width: usize,
    len: usize,
    softplus: bool,
    reverse: bool,
}

impl<'a, E: Elem> Block<'a, E> {
    fn new(cx: &Ctx<'a, E>, k: usize, t: Task) -> Self {
        let (x, s) = (&cx.dirs[k], cx.s);
        let (bt, ct) = (&cx.bcs[k].0, &cx.bcs[k].1);
        let (n, len, width) = (s.dstate, s.len, t.width());
        let rows = (t.b * s.dim + t.d0) * len..(t.b * s.dim + t.d1) * len;
        let slab = (t.b * s.groups + t.d0 / s.per_group()) * len * n;
        let lanes = |v: Option<&[f32]>| {
            let mut out = ZERO;
            if let Some(v) = v {
                out[..width].copy_from_slice(&v[t.d0..t.d1]);
            }
            out
        };
        let mut a = vec![ZERO; n];
        for (k, arow) in x.a[t.d0 * n..t.d1 * n].chunks_exact(n).enumerate() {
            for (an, &v) in a.iter_mut().zip(arow) {
                an[k] = v;
            }
        }
        Self {
            u: &x.u[rows.clone()],
            delta: &x.delta[rows],
            a,
            d: lanes(x.d),
            bias: lanes(x.delta_bias),
            bt: &bt[slab..slab + len * n],
            ct: &ct[slab..slab + len * n],
            width,
            len,
            softplus: cx.softplus,
            reverse: x.reverse,
        }
    }

    fn segments(&self) -> usize {
        self.len.div_ceil(SEGMENT)
    }

    /// The `seg`-th stretch of `size` steps in scan order: its first
    /// position and length.
    #[inline(always)]
    fn stretch(&self, seg: usize, size: usize) -> (usize, usize) {
        let i0 = seg * size;
        let m = size.min(self.len - i0);
        (if self.reverse { self.len - i0 - m } else { i0 }, m)
    }

    /// The `seg`-th segment in scan order: its first position and length.
    #[inline(always)]
    fn segment(&self, seg: usize) -> (usize, usize) {
        self.stretch(seg, SEGMENT)
    }

    /// Offset from the segment's first position of its `j`-th step in scan order.
    #[inline(always)]
    fn step(&self, j: usize, m: usize) -> usize {
        if self.reverse {
            m - 1 - j
        } else {
            j
        }
    }

    /// Segment `seg`'s Δ, dΔ/d(delta) and `u`, preparing its chunk into `p`
    /// unless `p` holds it already (`dsp` only if `with_dsp`).
    #[inline(always)]
    fn prep<'p, M: MulAdd>(
        &self,
        seg: usize,
        p: &'p mut Prep,
        rows: &mut Rows,
        with_dsp: bool,
    ) -> Seg<'p> {
        let c = seg / (CHUNK / SEGMENT);
        let (c0, cm) = self.stretch(c, CHUNK);
        if !matches!(p.held, Some((held, dsp)) if held == c && (dsp || !with_dsp)) {
            self.prep_chunk::<M>(c0, cm, p, rows, with_dsp);
            p.held = Some((c, with_dsp));
        }
        let (l0, m) = self.segment(seg);
        let r = l0 - c0..l0 - c0 + m;
        Seg {
            dt: &p.dt[r.clone()],
            dsp: &p.dsp[r.clone()],
            u: &p.u[r],
        }
    }

    /// Fills `p` for positions `l0..l0 + m`, `m ≤ CHUNK` (`p.dsp` only if `with_dsp`).
    #[inline(always)]
    fn prep_chunk<M: MulAdd>(
        &self,
        l0: usize,
        m: usize,
        p: &mut Prep,
        rows: &mut Rows,
        with_dsp: bool,
    ) {
        let m = m.min(CHUNK); // lets the compiler drop the bounds checks below
        for k in 0..LANES {
            let (xr, ur) = (&mut rows.x[k][..m], &mut rows.u[k][..m]);
            if k >= self.width {
                xr.fill(0.0);
                ur.fill(0.0);
                continue;
            }
            let row = k * self.len + l0;
            let (delta, u) = (&self.delta[row..row + m], &self.u[row..row + m]);
            let bias = self.bias[k];
            for i in 0..m {
                xr[i] = delta[i].to_f32() + bias;
                ur[i] = u[i].to_f32();
            }
        }
        for i in 0..m {
            // An opaque use of `i` keeps the compiler from vectorising this
            // loop across positions (sixteen vectors of positions, then
            // scattered stores): the lanes are what should be vectorised.
            let i = std::hint::black_box(i);
            let (mut x, mut u) = (ZERO, ZERO);
            for k in 0..LANES {
                x[k] = rows.x[k][i];
                u[k] = rows.u[k][i];
            }
            // Padding lanes: Δ = softplus(0), harmless with A = u = 0 there.
            (p.dt[i], p.dsp[i]) = match (self.softplus, with_dsp) {
                (true, true) => softplus_sigmoid::<M, _>(x),
                (true, false) => (softplus_sigmoid::<M, _>(x).0, ZERO),
                (false, _) => (x, Lanes::splat(1.0)),
            };
            p.u[i] = u;
        }
    }

    /// Runs the `m` steps of the segment at positions `l0..l0 + m` from the
    /// state `h` (updated in place), with `p` its inputs. `Y`: adds y
    /// (skip term included) to `acc`. `KEEP`: stores every step's state and
    /// decays into `hs`, `decay` (`(m, N)`, in scan order).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn run<M: MulAdd, const Y: bool, const KEEP: bool>(
        &self,
        l0: usize,
        m: usize,
        p: Seg<'_>,
        h: &mut [Lanes],
        acc: &mut [Lanes],
        hs: &mut [Lanes],
        decay: &mut [Lanes],
    ) {
        let n = self.a.len();
        let (a, h) = (&self.a[..n], &mut h[..n]);
        for j in 0..m {
            let i = self.step(j, m);
            let l = l0 + i;
            let (dt, u) = (p.dt[i], p.u[i]);
            let dtu = dt * u;
            let b = &self.bt[l * n..(l + 1) * n];
            let c = &self.ct[l * n..(l + 1) * n];
            let mut keep = KEEP.then(|| (&mut hs[j * n..][..n], &mut decay[j * n..][..n]));
            // The N recurrences are independent and lane-wise: no reduction.
            let mut y = self.d * u;
            for q in 0..n {
                // Without the sum over q (Y off) the compiler would vectorise
                // across states, scattering to `hs`; an opaque use of `q`
                // keeps the vectors on the lanes (see `prep`).
                let q = if Y { q } else { std::hint::black_box(q) };
                let e = exp::<M, _>(dt * a[q]);
                let hq = e.mul_add::<M>(h[q], dtu * b[q]);
                h[q] = hq;
                if Y {
                    y = hq.mul_add::<M>(Lanes::splat(c[q]), y);
                }
                if let Some((hs, decay)) = keep.as_mut() {
                    (hs[q], decay[q]) = (hq, e);
                }
            }
            if Y {
                acc[l] = acc[l] + y;
            }
        }
    }

    /// The whole scan: adds this direction's y (skip term included) to
    /// `acc`. For the backward, `keep` gets the state before every segment
    /// and the states and decays of the last one, which the backward walks
    /// first and so need not recompute; `p` is left holding the last chunk.
    #[inline(always)]
    fn forward<M: MulAdd>(
        &self,
        acc: &mut [Lanes],
        mut keep: Option<Keep<'_>>,
        h: &mut [Lanes],
        p: &mut Prep,
        rows: &mut Rows,
    ) {
        let n = self.a.len();
        let h = &mut h[..n];
        h.fill(ZERO);
        p.held = None; // another task's
        let last = self.segments() - 1;
        for seg in 0..=last {
            let (l0, m) = self.segment(seg);
            let p = self.prep::<M>(seg, p, rows, keep.is_some());
            let Some(k) = keep.as_mut() else {
                self.run::<M, true, false>(l0, m, p, h, acc, &mut [], &mut []);
                continue;
            };
            k.ckpt[seg * n..(seg + 1) * n].copy_from_slice(h);
            // y only where the backward needs it (for dz).
            match (k.y, seg == last) {
                (true, false) => self.run::<M, true, false>(l0, m, p, h, acc, &mut [], &mut []),
                (false, false) => self.run::<M, false, false>(l0, m, p, h, acc, &mut [], &mut []),
                (true, true) => self.run::<M, true, true>(l0, m, p, h, acc, k.hs, k.decay),
                (false, true) => self.run::<M, false, true>(l0, m, p, h, acc, k.hs, k.decay),
            }
        }
    }

    /// Walks the scan backwards given `ybar = dL/dy` (by position) and
    /// what [`Block::forward`] kept; writes this block's share of the
    /// gradients into `o`.
    #[inline(always)]
    fn backward<M: MulAdd>(
        &self,
        ybar: &[Lanes],
        k: Keep<'_>,
        o: &mut TaskDir<'_, E>,
        w: &mut Walk,
        h: &mut [Lanes],
        p: &mut Prep,
        rows: &mut Rows,
    ) {
        let n = self.a.len();
        let len = self.len;
        let ybar = &ybar[..len];
        let (a, h) = (&self.a[..n], &mut h[..n]);
        let (hs, decay) = (k.hs, k.decay);
        let (carry, da) = (&mut w.carry[..n], &mut w.da[..n]);
        let (pb, pc) = (&mut w.pb[..n], &mut w.pc[..n]);
        carry.fill(ZERO);
        da.fill(ZERO64);
        let (mut dd_sum, mut dbias_sum) = (ZERO64, ZERO64);
        let last = self.segments() - 1;
        for seg in (0..=last).rev() {
            let (l0, m) = self.segment(seg);
            let p = self.prep::<M>(seg, p, rows, true);
            let ck = &k.ckpt[seg * n..(seg + 1) * n];
            if seg != last {
                // Recompute the segment's states and decays from its stored start.
                h.copy_from_slice(ck);
                self.run::<M, false, true>(l0, m, p, h, &mut [], hs, decay);
            }
            for j in (0..m).rev() {
                let i = self.step(j, m);
                let l = l0 + i;
                let (dt, u) = (p.dt[i], p.u[i]);
                let dtu = dt * u;
                let yb = ybar[l];
                let b = &self.bt[l * n..(l + 1) * n];
                let c = &self.ct[l * n..(l + 1) * n];
                let hprev = if j == 0 { ck } else { &hs[(j - 1) * n..j * n] };
                let hj = &hs[j * n..(j + 1) * n];
                let dec = &decay[j * n..(j + 1) * n];
                let db = &mut o.db[l * n..(l + 1) * n];
                let dc = &mut o.dc[l * n..(l + 1) * n];
                let (mut ddt, mut dus) = (ZERO, ZERO);
                for q in 0..n {
                    // dL/dh_l: from y_l, plus what flows back from h_{l+1}.
                    let g = yb.mul_add::<M>(Lanes::splat(c[q]), carry[q]);
                    let gdecay = g * hprev[q] * dec[q]; // dL/d(Δ·A)
                    let gb = g * b[q];
                    ddt = gdecay.mul_add::<M>(a[q], gb.mul_add::<M>(u, ddt));
                    dus = dus + gb;
                    da[q] = da[q].add_f32(gdecay * dt);
                    (pb[q], pc[q]) = (g * dtu, yb * hj[q]);
                    carry[q] = dec[q] * g;
                }
                // dB, dC are shared by the block's channels: lane sums, taken
                // in a loop of their own (inside the loop above the compiler
                // splits them into many narrow pieces). The opaque `q` keeps
                // it from vectorising across states with gathers.
                for q in 0..n {
                    let q = std::hint::black_box(q);
                    (db[q], dc[q]) = (pb[q].sum(), pc[q].sum());
                }
                let dd = ddt * p.dsp[i];
                w.du[i] = dt.mul_add::<M>(dus, self.d * yb);
                w.dd[i] = dd;
                dd_sum = dd_sum.add_f32(yb * u);
                dbias_sum = dbias_sum.add_f32(dd);
            }
            for k in 0..self.width {
                let row = k * len + l0;
                let (du, dd) = (&mut o.du[row..row + m], &mut o.ddelta[row..row + m]);
                for i in 0..m {
                    du[i] = E::from_f32(w.du[i][k]);
                    dd[i] = E::from_f32(w.dd[i][k]);
                }
            }
        }
        for k in 0..self.width {
            for q in 0..n {
                o.da[k * n + q] = da[q].0[k] as f32;
            }
            o.dd[k] = dd_sum.0[k] as f32;
            o.dbias[k] = dbias_sum.0[k] as f32;
        }
    }
}

/// What the forward leaves for the backward, for one direction of a task.
struct Keep<'a> {
    /// The state before every segment: `(segments, N)`.
    ckpt: &'a mut [Lanes],
    /// States and decays of one segment, `(SEGMENT, N)`: the last one from
    /// the forward, then each recomputed in turn.
    hs: &'a mut [Lanes],
    decay: &'a mut [Lanes],
    /// Whether the forward must still add y (needed for dz only).
    y: bool,
}

impl<'a> Keep<'a> {
    /// One per direction, from the scratch's buffers.
    fn per_dir(
        ckpt: &'a mut [Lanes],
        hs: &'a mut [Lanes],
        decay: &'a mut [Lanes],
        ckpt_len: usize,
        seg_len: usize,
        y: bool,
    ) -> Vec<Self> {
        ckpt.chunks_exact_mut(ckpt_len)
            .zip(hs.chunks_exact_mut(seg_len))
            .zip(decay.chunks_exact_mut(seg_len))
            .map(|((ckpt, hs), decay)| Keep { ckpt, hs, decay, y })
            .collect()
    }
}

/// The forward of one task: its rows of `y`.
#[inline(always)]
pub(super) fn forward_task<E: Elem, M: MulAdd>(
    cx: &Ctx<'_, E>,
    t: Task,
    y: &mut [E],
    s: &mut Scratch,
) {
    let len = cx.s.len;
    let acc = &mut s.acc[..len];
    acc.fill(ZERO);
    for k in 0..cx.dirs.len() {
        Block::new(cx, k, t).forward::<M>(acc, None, &mut s.h, &mut s.preps[0], &mut s.rows);
    }
    for k in 0..t.width() {
        let row = &mut s.row[..len];
        for (r, v) in row.iter_mut().zip(acc.iter()) {
            *r = v[k];
        }
        let y = &mut y[k * len..(k + 1) * len];
        match cx.z {
            Some(z) => {
                let zrow = &z[(t.b * cx.s.dim + t.d0 + k) * len..][..len];
                for l in 0..len {
                    y[l] = E::from_f32(row[l] * silu::<M, f32>(zrow[l].to_f32()));
                }
            }
            None => {
                for l in 0..len {
                    y[l] = E::from_f32(row[l]);
                }
            }
        }
    }
}

/// The backward of one task: its share of every direction's gradients, and
/// its rows of `dz`.
#[inline(always)]
pub(super) fn backward_task<E: Elem, M: MulAdd>(
    cx: &Ctx<'_, E>,
    t: Task,
    dy: &[E],
    outs: &mut [TaskDir<'_, E>],
    mut dz: Option<&mut [E]>,
    s: &mut Scratch,
) {
    let (len, n) = (cx.s.len, cx.s.dstate);
    let Scratch {
        preps,
        rows,
        h,
        acc,
        row,
        ckpt,
        hs,
        decay,
        walk,
    } = s;
    let blocks: Vec<Block<'_, E>> = (0..cx.dirs.len()).map(|k| Block::new(cx, k, t)).collect();
    let (ckpt_len, y) = (len.div_ceil(SEGMENT) * n, cx.z.is_some());
    let acc = &mut acc[..len];
    acc.fill(ZERO);
    let keeps = Keep::per_dir(ckpt, hs, decay, ckpt_len, SEGMENT * n, y);
    for ((bl, keep), p) in blocks.iter().zip(keeps).zip(preps.iter_mut()) {
        bl.forward::<M>(acc, Some(keep), h, p, rows);
    }
    // dL/dy of the ungated sum (and dz from that sum), lane by lane in place
    // of that sum; computed over contiguous positions.
    for k in 0..LANES {
        let r = &mut row[..len];
        let rowi = (t.b * cx.s.dim + t.d0 + k) * len;
        match cx.z {
            _ if k >= t.width() => r.fill(0.0),
            Some(z) => {
                for (r, v) in r.iter_mut().zip(acc.iter()) {
                    *r = v[k];
                }
                let (zrow, dyrow) = (&z[rowi..rowi + len], &dy[rowi..rowi + len]);
                let dz = &mut dz.as_deref_mut().expect("dz given with z")[k * len..(k + 1) * len];
                for l in 0..len {
                    let (zl, g, ysum) = (zrow[l].to_f32(), dyrow[l].to_f32(), r[l]);
                    let sg = logistic::<M, f32>(zl);
                    r[l] = g * zl * sg;
                    dz[l] = E::from_f32(g * ysum * sg * (1.0 + zl * (1.0 - sg)));
                }
            }
            None => {
                for (r, g) in r.iter_mut().zip(&dy[rowi..rowi + len]) {
                    *r = g.to_f32();
                }
            }
        }
        for (v, &r) in acc.iter_mut().zip(r.iter()) {
            v[k] = r;
        }
    }
    let keeps = Keep::per_dir(ckpt, hs, decay, ckpt_len, SEGMENT * n, y);
    let dirs = blocks
        .iter()
        .zip(keeps)
        .zip(outs.iter_mut())
        .zip(preps.iter_mut());
    for (((bl, keep), out), p) in dirs {
        bl.backward::<M>(acc, keep, out, walk, h, p, rows);
    }
}

/// Per direction, `B` and `C` transposed to `(batch, G, L, N)` f32.
pub(super) fn transposed_bcs<E: Elem>(
    s: Shape,
    dirs: &[DirInputs<'_, E>],
) -> Vec<(Vec<f32>, Vec<f32>)> {
    dirs.iter()
        .map(|x| (transpose_bc(x.b, s), transpose_bc(x.c, s)))
        .collect()
}

/// A task's slices of one direction's outputs and partial sums.
pub(super) struct TaskDir<'a, E> {
    pub(super) du: &'a mut [E],
    pub(super) ddelta: &'a mut [E],
    pub(super) da: &'a mut [f32],
    pub(super) dd: &'a mut [f32],
    pub(super) dbias: &'a mut [f32],
    /// `(L, N)`: this task's share of dB and dC.
    pub(super) db: &'a mut [f32],
    pub(super) dc: &'a mut [f32],
}
