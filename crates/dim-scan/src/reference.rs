//! A naive selective scan written with plain `tch` operations: a loop over
//! `L`, in whatever dtype the inputs have (tests use f64). It is differentiable
//! through libtorch's own autograd, which makes it an independent reference for
//! both the values and the gradients of the fused op.

use tch::Tensor;

use crate::{Direction, ScanInputs};

/// One direction, ungated: `(batch, D, L)`.
fn scan_direction(x: &ScanInputs<'_>, direction: Direction, delta_softplus: bool) -> Tensor {
    let (batch, dim, len) = x.u.size3().expect("u is (batch, D, L)");
    let groups = x.b.size()[1];
    let n = x.a.size()[1];
    // Out of place throughout: the inputs are the caller's autograd leaves.
    let delta = match x.delta_bias {
        Some(bias) => x.delta + bias.view([1, dim, 1]),
        None => x.delta.shallow_clone(),
    };
    let delta = if delta_softplus {
        delta.softplus()
    } else {
        delta
    };
    // (batch, G, N, L) -> (batch, D, N, L): channel d reads group d / (D / G).
    let per_group = dim / groups;
    let b = x.b.repeat_interleave_self_int(per_group, 1, None);
    let c = x.c.repeat_interleave_self_int(per_group, 1, None);
    let a = x.a.view([1, dim, n]);
    let mut h = Tensor::zeros([batch, dim, n], (x.u.kind(), x.u.device()));
    let mut ys: Vec<Option<Tensor>> = (0..len).map(|_| None).collect();
    let order: Box<dyn Iterator<Item = i64>> = match direction {
        Direction::Forward => Box::new(0..len),
        Direction::Reverse => Box::new((0..len).rev()),
    };
    for l in order {
        let dt = delta.select(2, l).unsqueeze(-1); // (batch, D, 1)
        let ul = x.u.select(2, l).unsqueeze(-1);
        h = (&dt * &a).exp() * &h + &dt * b.select(3, l) * &ul;
        let y = (&h * c.select(3, l)).sum_dim_intlist(-1, false, None);
        let y = match x.d {
            Some(d) => y + d.view([1, dim]) * ul.squeeze_dim(-1),
            None => y,
        };
        ys[l as usize] = Some(y);
    }
    let ys: Vec<Tensor> = ys
        .into_iter()
        .map(|y| y.expect("every l visited"))
        .collect();
    Tensor::stack(&ys, 2)
}

/// Reference for [`crate::selective_scan`]: `(batch, D, L)`.
pub fn selective_scan_ref(
    x: ScanInputs<'_>,
    direction: Direction,
    z: Option<&Tensor>,
    delta_softplus: bool,
) -> Tensor {
    gate(scan_direction(&x, direction, delta_softplus), z)
}

/// Reference for [`crate::selective_scan_bidirectional`]: `(batch, D, L)`.
pub fn selective_scan_bidirectional_ref(
    forward: ScanInputs<'_>,
    reverse: ScanInputs<'_>,
    z: Option<&Tensor>,
    delta_softplus: bool,
) -> Tensor {
    let y = scan_direction(&forward, Direction::Forward, delta_softplus)
        + scan_direction(&reverse, Direction::Reverse, delta_softplus);
    gate(y, z)
}

fn gate(y: Tensor, z: Option<&Tensor>) -> Tensor {
    match z {
        Some(z) => y * z.silu(),
        None => y,
    }
}
