//! The multi-threaded CPU implementation of the selective scan, forward and
//! backward, on plain slices (no libtorch). The autograd op calls it for CPU
//! tensors through the C-ABI adapter in `ffi.rs`.
//!
//! The SIMD lanes run over channels: a block of up to 16 (`LANES`)
//! consecutive channels of one group and one batch element shares `B_l` and
//! `C_l`, so the state update `h[n] = exp(Δ·A[n])·h[n] + Δ·u·B_l[n]` and
//! `y += C_l[n]·h[n]` are lane-wise operations on `[f32; 16]` values
//! (`Lanes`), with no horizontal reduction in the forward and the `N`
//! independent recurrences giving instruction-level parallelism. The
//! lane-wise operations are tiny fixed-length loops that the compiler unrolls,
//! keeps in registers and vectorises; the exponential, softplus and sigmoid
//! are polynomials written once for `f32` and for `Lanes` (no libm calls). Δ
//! and `u` are prepared per chunk of positions and moved from the row layout
//! of the tensors to the lane layout once. The task kernels are compiled once
//! per instruction set (AVX-512, AVX2 + FMA, baseline) from the same code and
//! picked at run time.
//!
//! Work is split over (batch, channel block) with rayon. The backward
//! recomputes the states: a first pass stores the state every [`SEGMENT`]
//! positions, then each segment is recomputed (keeping its states and decays)
//! and walked backwards. Reductions (over batch for `dA`, `dD`, `delta_bias`;
//! over the channels of a group for `dB`, `dC`) go through per-task partial
//! sums added in a fixed order (within a block, a fixed tree over the lanes),
//! so results do not depend on the thread count: the CPU backward is always
//! deterministic.
//!
//! Layers, each using only those above it in this list (no module cycles):
//! `types` (element types, [`Shape`], the inputs and gradients of a call),
//! `simd` (the lanes), `math` (exponential, softplus, sigmoid, fused or
//! unfused multiply-add), `kernel` (the per-task loops, generic over element
//! type and multiply-add), `dispatch` (instruction-set detection, one
//! compilation of the kernels per instruction set), and this module (the
//! public calls: tasks over threads, fixed-order reductions).

mod dispatch;
mod kernel;
mod math;
mod simd;
mod types;

use rayon::prelude::*;

use dispatch::{BackwardTask, ForwardTask};
use kernel::{tasks, transposed_bcs, Ctx, Scratch, Task, TaskDir};
use simd::LANES;

pub use dispatch::Isa;
pub use kernel::SEGMENT;
pub use types::{DirGrads, DirInputs, Elem, Shape};

/// Forward: `y` `(batch, D, L)` = Σ_dirs scan(dir), gated by `silu(z)` if
/// given, with the task kernels compiled for `isa` (usually [`Isa::detect`]).
pub fn forward<E: Elem>(
    isa: Isa,
    s: Shape,
    dirs: &[DirInputs<'_, E>],
    z: Option<&[E]>,
    y: &mut [E],
    delta_softplus: bool,
) {
    let bcs = transposed_bcs(s, dirs);
    let cx = Ctx {
        s,
        dirs,
        bcs: &bcs,
        z,
        softplus: delta_softplus,
    };
    let tasks = tasks(s);
    let ys = split_mut(y, tasks.iter().map(|t| t.width() * s.len));
    tasks
        .par_iter()
        .zip(ys)
        .with_min_len(min_len(tasks.len()))
        .for_each_init(
            || Scratch::new(s, dirs.len(), false),
            |scratch, (&t, y)| {
                isa.run(ForwardTask {
                    cx: &cx,
                    t,
                    y,
                    scratch,
                })
            },
        );
}

/// Tasks per rayon job: few enough jobs that the scratch (allocated per job)
/// is not rebuilt for every few tasks, enough for the threads to balance.
fn min_len(tasks: usize) -> usize {
    tasks.div_ceil(4 * rayon::current_num_threads()).max(1)
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

/// Backward: writes every gradient of every direction (and `dz` when `z` is
/// given), with the task kernels compiled for `isa` (usually [`Isa::detect`]).
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Elem>(
    isa: Isa,
    s: Shape,
    dirs: &[DirInputs<'_, E>],
    z: Option<&[E]>,
    dy: &[E],
    grads: &mut [DirGrads<'_, E>],
    dz: Option<&mut [E]>,
    delta_softplus: bool,
) {
    let (n, len) = (s.dstate, s.len);
    let tasks = tasks(s);
    let chunks = s.per_group().div_ceil(LANES);
    let bcs = transposed_bcs(s, dirs);
    let cx = Ctx {
        s,
        dirs,
        bcs: &bcs,
        z,
        softplus: delta_softplus,
    };
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
    let widths: Vec<usize> = tasks.iter().map(Task::width).collect();
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
    let dz_pieces: Vec<Option<&mut [E]>> = match dz {
        Some(dz) => split_mut(dz, widths.iter().map(|w| w * len))
            .into_iter()
            .map(Some)
            .collect(),
        None => tasks.iter().map(|_| None).collect(),
    };

    tasks
        .par_iter()
        .zip(per_task.par_iter_mut())
        .zip(dz_pieces)
        .with_min_len(min_len(tasks.len()))
        .for_each_init(
            || Scratch::new(s, ndirs, true),
            |scratch, ((&t, outs), dz)| {
                isa.run(BackwardTask {
                    cx: &cx,
                    t,
                    dy,
                    outs,
                    dz,
                    scratch,
                })
            },
        );
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

/// The instruction sets against each other and the thread count (the
/// integration tests check values against an f64 reference, on the best one).
#[cfg(test)]
mod isa_tests {
    use super::*;

    use crate::testing::{lcg_values, DirData};

    /// Two directions' inputs, `z`, `dy` for a shape.
    struct Problem {
        s: Shape,
        dirs: [DirData; 2],
        z: Vec<f32>,
        dy: Vec<f32>,
    }

    impl Problem {
        fn new(s: Shape, seed: u64) -> Self {
            let bdl = s.batch * s.dim * s.len;
            Self {
                s,
                dirs: [DirData::new(s, seed), DirData::new(s, seed + 10)],
                z: lcg_values(bdl, seed + 20, -2.0, 2.0),
                dy: lcg_values(bdl, seed + 21, -1.0, 1.0),
            }
        }

        /// y, then every gradient of both directions and dz, flattened.
        fn run(&self, isa: Isa) -> (Vec<f32>, Vec<f32>) {
            let s = self.s;
            let dirs = [self.dirs[0].inputs(false), self.dirs[1].inputs(true)];
            let mut y = vec![0f32; self.z.len()];
            forward(isa, s, &dirs, Some(&self.z), &mut y, true);
            // NaN: an output left unwritten shows.
            let mut bufs = self.dirs.each_ref().map(|d| d.filled_like(f32::NAN));
            let mut dz = vec![f32::NAN; self.z.len()];
            {
                let [b0, b1] = &mut bufs;
                let mut grads = [b0.grads(), b1.grads()];
                let z = Some(&self.z[..]);
                backward(isa, s, &dirs, z, &self.dy, &mut grads, Some(&mut dz), true);
            }
            let mut all: Vec<f32> = bufs.into_iter().flat_map(|b| b.0.concat()).collect();
            all.extend(dz);
            (y, all)
        }
    }

    fn shape() -> Shape {
        // 10 channels per group (a padded block), three segments and a bit.
        Shape {
            batch: 2,
            dim: 20,
            len: 3 * SEGMENT + 37,
            dstate: 5,
            groups: 2,
        }
    }

    #[test]
    fn instruction_sets_agree() {
        let p = Problem::new(shape(), 7);
        let (y0, g0) = p.run(Isa::Baseline);
        assert!(g0.iter().all(|v| v.is_finite()), "every gradient written");
        for isa in Isa::available() {
            let (y, g) = p.run(isa);
            for (name, got, want) in [("y", &y, &y0), ("grads", &g, &g0)] {
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = got
                    .iter()
                    .zip(want.iter())
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    worst <= 1e-5 * scale,
                    "{isa:?} {name}: {worst:e} of {scale:e}"
                );
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let p = Problem::new(shape(), 11);
        let isa = Isa::detect();
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| p.run(isa))
        };
        let one = on(1);
        for threads in [2, 3] {
            let (y, g) = on(threads);
            assert!(y == one.0 && g == one.1, "{threads} threads differ from 1");
        }
    }
}
