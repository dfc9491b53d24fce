//! Instruction-set detection and dispatch: the task kernels of `kernel`,
//! written once, compiled once per instruction set (AVX-512, AVX2 + FMA,
//! baseline) and picked at run time. Uses `types`, `math` and `kernel`.

use super::kernel::{backward_task, forward_task, Ctx, Scratch, Task, TaskDir};
use super::math::{Fused, MulAdd, Unfused};
use super::types::Elem;

/// The instruction set the CPU task kernels are compiled for; every variant
/// gives the same results up to the rounding of fused multiply-adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub enum Isa {
    /// Portable code, no fused multiply-add.
    Baseline,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F (with AVX2 and FMA).
    Avx512,
}

impl Isa {
    /// The widest instruction set this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }

    /// The ones this CPU can run (the tests compare them).
    #[cfg(test)]
    pub(super) fn available() -> Vec<Self> {
        let mut out = vec![Self::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                out.push(Self::Avx2);
                if is_x86_feature_detected!("avx512f") {
                    out.push(Self::Avx512);
                }
            }
        }
        out
    }
}

/// A task kernel with its arguments, to run with `a·b + c` evaluated by `M`.
pub(super) trait TaskKernel {
    fn run<M: MulAdd>(self);
}

/// [`forward_task`]'s arguments: a task's rows of `y`.
pub(super) struct ForwardTask<'a, 'c, E> {
    pub(super) cx: &'a Ctx<'c, E>,
    pub(super) t: Task,
    pub(super) y: &'a mut [E],
    pub(super) scratch: &'a mut Scratch,
}

impl<E: Elem> TaskKernel for ForwardTask<'_, '_, E> {
    #[inline(always)]
    fn run<M: MulAdd>(self) {
        forward_task::<E, M>(self.cx, self.t, self.y, self.scratch)
    }
}

/// [`backward_task`]'s arguments: a task's share of every direction's
/// gradients, and its rows of `dz`.
pub(super) struct BackwardTask<'a, 'c, E> {
    pub(super) cx: &'a Ctx<'c, E>,
    pub(super) t: Task,
    pub(super) dy: &'a [E],
    pub(super) outs: &'a mut [TaskDir<'c, E>],
    pub(super) dz: Option<&'a mut [E]>,
    pub(super) scratch: &'a mut Scratch,
}

impl<E: Elem> TaskKernel for BackwardTask<'_, '_, E> {
    #[inline(always)]
    fn run<M: MulAdd>(self) {
        backward_task::<E, M>(self.cx, self.t, self.dy, self.outs, self.dz, self.scratch)
    }
}

// A kernel once per instruction set: the same code, inlined into a function
// compiled with wider registers (AVX-512: 16 lanes per register) and fused
// multiply-adds where the CPU has them (so the last bits of the results
// depend on the instruction set, never on the thread count).

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<K: TaskKernel>(k: K) {
    k.run::<Fused>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: TaskKernel>(k: K) {
    k.run::<Fused>()
}

impl Isa {
    /// Runs `k` compiled for this instruction set.
    pub(super) fn run<K: TaskKernel>(self, k: K) {
        match self {
            // SAFETY: only `detect` (or the tests' `available`) makes an
            // `Isa` other than `Baseline`, having seen the CPU support it.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { run_avx512(k) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { run_avx2(k) },
            _ => k.run::<Unfused>(),
        }
    }
}
