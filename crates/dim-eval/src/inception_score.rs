//! Inception Score (Salimans et al. 2016) as the ADM evaluator computes it:
//! class probabilities are split into chunks of `split_size` (5,000); each
//! chunk scores `exp(mean_i KL(p(y|x_i) ‖ p(y)))` with `p(y)` the chunk's
//! mean; the score is the mean over chunks.

use tch::{Kind, Tensor};

use crate::{EvalError, Result};

/// IS of logits `(N, K)` (softmax taken here), in f64.
pub fn inception_score(logits: &Tensor, split_size: i64) -> Result<f64> {
    let s = logits.size();
    if s.len() != 2 || s[0] == 0 {
        return Err(EvalError::Shape {
            what: "logits",
            detail: format!("expected (N, K) with N > 0, got {s:?}"),
        });
    }
    let p = logits.to_kind(Kind::Double).softmax(1, Kind::Double);
    let mut scores = Vec::new();
    for first in (0..s[0]).step_by(split_size.max(1) as usize) {
        let part = p.narrow(0, first, split_size.min(s[0] - first));
        let py = part.mean_dim(0, true, Kind::Double);
        let kl = &part * (part.clamp_min(1e-300).log() - py.clamp_min(1e-300).log());
        let m = kl
            .sum_dim_intlist(1, false, Kind::Double)
            .mean(Kind::Double);
        scores.push(m.double_value(&[]).exp());
    }
    Ok(scores.iter().sum::<f64>() / scores.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn matches_a_plain_f64_transcription() {
        let l = Tensor::randn([23, 7], (Kind::Float, Device::Cpu)) * 3.0;
        let rows: Vec<Vec<f64>> = (0..23)
            .map(|i| Vec::<f64>::try_from(l.get(i).to_kind(Kind::Double)).unwrap())
            .collect();
        let softmax = |r: &Vec<f64>| {
            let m = r.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = r.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect::<Vec<_>>()
        };
        let p: Vec<Vec<f64>> = rows.iter().map(softmax).collect();
        let mut scores = vec![];
        for chunk in p.chunks(10) {
            let k = chunk[0].len();
            let py: Vec<f64> = (0..k)
                .map(|j| chunk.iter().map(|r| r[j]).sum::<f64>() / chunk.len() as f64)
                .collect();
            let kl: f64 = chunk
                .iter()
                .map(|r| (0..k).map(|j| r[j] * (r[j].ln() - py[j].ln())).sum::<f64>())
                .sum::<f64>()
                / chunk.len() as f64;
            scores.push(kl.exp());
        }
        let want = scores.iter().sum::<f64>() / scores.len() as f64;
        let got = inception_score(&l, 10).unwrap();
        assert!((got - want).abs() < 1e-12 * want, "{got} vs {want}");
        // All-equal rows carry no information: IS = 1.
        let same = Tensor::ones([5, 4], (Kind::Float, Device::Cpu));
        assert!((inception_score(&same, 5000).unwrap() - 1.0).abs() < 1e-12);
    }
}
