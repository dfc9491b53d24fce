//! improved-DDPM's timestep respacing strings (`"ddimN"`, `"250"`,
//! `"10,15,20"`), parsed into the kept training timesteps.

use crate::error::{config_err, Result};

/// improved-DDPM's `space_timesteps`: the (sorted) training timesteps kept by a
/// respacing string: `"ddimN"` (integer stride giving exactly N steps) or
/// comma-separated counts, one per equal section of `[0, T)` (e.g. `"250"` or
/// `"10,15,20"`). Python's round-half-to-even is reproduced.
pub fn parse_respacing(num_timesteps: usize, s: &str) -> Result<Vec<usize>> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("ddim") {
        let n: usize = rest.parse().map_err(|_| {
            crate::DiffusionError::Config(format!("bad respacing {s:?}: expected ddimN"))
        })?;
        for stride in 1..num_timesteps {
            if num_timesteps.div_ceil(stride) == n {
                return Ok((0..num_timesteps).step_by(stride).collect());
            }
        }
        return config_err(format!(
            "respacing {s:?}: cannot create exactly {n} steps from {num_timesteps} with an integer stride"
        ));
    }
    let counts: Vec<usize> = s
        .split(',')
        .map(|c| c.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            crate::DiffusionError::Config(format!(
                "bad respacing {s:?}: expected \"N\", \"ddimN\" or comma-separated counts"
            ))
        })?;
    if counts.is_empty() || counts.iter().all(|&c| c == 0) {
        return config_err(format!("respacing {s:?} keeps no timesteps"));
    }
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0usize;
    let mut all = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < count {
            return config_err(format!(
                "respacing {s:?}: cannot divide a section of {size} timesteps into {count} steps (T = {num_timesteps})"
            ));
        }
        let frac_stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            all.push(start + cur.round_ties_even() as usize);
            cur += frac_stride;
        }
        start += size;
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respacing_matches_improved_ddpm() {
        // Values from improved-diffusion's space_timesteps.
        assert_eq!(
            parse_respacing(1000, "ddim50").unwrap(),
            (0..1000).step_by(20).collect::<Vec<_>>()
        );
        let r = parse_respacing(1000, "250").unwrap();
        assert_eq!(r.len(), 250);
        assert_eq!(&r[..6], &[0, 4, 8, 12, 16, 20]);
        assert_eq!(*r.last().unwrap(), 999);
        assert_eq!(parse_respacing(300, "10,15,20").unwrap().len(), 45);
        assert_eq!(parse_respacing(100, "10,10").unwrap()[..3], [0, 5, 11]);
        assert_eq!(
            parse_respacing(1000, "1000").unwrap(),
            (0..1000).collect::<Vec<_>>()
        );
        assert!(parse_respacing(10, "20").is_err());
        assert!(parse_respacing(10, "ddim7").is_err());
        assert!(parse_respacing(10, "abc").is_err());
    }
}
