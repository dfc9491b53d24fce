//! FVD: scipy's value on fixed feature sets, the streaming path through a
//! feature network in batches, clip checks, and the I3D architecture
//! against an independent implementation (cd-fvd's PyTorch port) at a
//! deterministic pseudo-random initialisation.

mod common;

use dim_eval::fvd::VideoFeatureExtractor;
use dim_eval::video_classifier::{VideoClassifier, FROZEN_CLASS, SHUFFLED_CLASS};
use dim_eval::{extract_video_features, fvd, I3d};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> serde_json::Value {
    let p = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn matrix(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let f = rows[0].len() as i64;
    Tensor::from_slice(&rows.concat()).reshape([-1, f])
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The feature sets of `fid_fixture.json` (written by scripts/fid_fixture.py
/// with numpy's covariance and `scipy.linalg.sqrtm`): FVD is the same
/// Fréchet distance, computed on clip features.
#[test]
fn fvd_on_fixed_features_matches_scipy() {
    let fx = fixture("fid_fixture.json");
    let (real, fake) = (matrix(&fx["real"]), matrix(&fx["fake"]));
    let expected = fx["fid"].as_f64().unwrap();
    let got = fvd(&real.to_kind(Kind::Float), &fake.to_kind(Kind::Float)).unwrap();
    assert!(
        (got - expected).abs() < 1e-5 * expected,
        "{got} vs scipy {expected}"
    );
}

/// A fake feature network (channel means and a temporal difference per
/// clip) streamed in uneven batches gives the FVD of the whole feature sets.
struct MeanFeatures;

impl VideoFeatureExtractor for MeanFeatures {
    fn name(&self) -> &str {
        "means"
    }
    fn dim(&self) -> i64 {
        3
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn features(&self, clips: &Tensor) -> dim_eval::Result<Tensor> {
        let m = clips.mean_dim(&[1i64, 3, 4][..], false, Kind::Float); // (N, T)
        let t = m.size()[1];
        let d = m.narrow(1, 1, t - 1) - m.narrow(1, 0, t - 1);
        Ok(Tensor::stack(
            &[
                m.mean_dim(1, false, Kind::Float),
                d.mean_dim(1, false, Kind::Float),
                (&m - m.mean_dim(1, true, Kind::Float))
                    .square()
                    .mean_dim(1, false, Kind::Float),
            ],
            1,
        ))
    }
}

#[test]
fn streamed_features_give_the_same_fvd() {
    common::fresh_seed("streamed_features_give_the_same_fvd");
    let a = Tensor::randn([37, 2, 5, 4, 3], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([29, 2, 5, 4, 3], (Kind::Float, Device::Cpu)) * 1.3 + 0.2;
    let whole = |x: &Tensor| MeanFeatures.features(x).unwrap();
    let batches = |x: &Tensor| x.split_with_sizes([10, 11, x.size()[0] - 21], 0);
    let fa = extract_video_features(&MeanFeatures, batches(&a)).unwrap();
    let fb = extract_video_features(&MeanFeatures, batches(&b)).unwrap();
    assert!(fa.allclose(&whole(&a), 1e-6, 1e-7, false));
    let d = fvd(&fa, &fb).unwrap();
    assert!((d - fvd(&whole(&a), &whole(&b)).unwrap()).abs() < 1e-9 * d.max(1.0));
    assert!(d > 0.0);
    assert!(fvd(&fa, &fa).unwrap() < 1e-9);
}

#[test]
fn bad_clips_are_errors() {
    let net = VideoClassifier::new(Device::Cpu);
    let msg = net
        .features(&Tensor::zeros([2, 1, 8, 8], (Kind::Float, Device::Cpu)))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("(N, C, T, H, W)"), "{msg}");
    let msg = I3d::prepare(&Tensor::zeros([1, 2, 4, 8, 8], (Kind::Float, Device::Cpu)))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("[1, 3]"), "{msg}");
    let msg = extract_video_features(&net, Vec::<Tensor>::new())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("need at least 1"), "{msg}");
}

/// Frozen and shuffled clips are what their labels say.
#[test]
fn corrupted_clips_match_their_labels() {
    common::fresh_seed("corrupted_clips_match_their_labels");
    let (b, t) = (200, 6);
    // Frame f of clip n is the constant n·T + f: the frame order is readable.
    let clips = Tensor::arange(b * t, (Kind::Float, Device::Cpu))
        .view([b, 1, t, 1, 1])
        .expand([b, 1, t, 3, 2], false)
        .contiguous();
    let labels = Tensor::randint(10, [b], (Kind::Int64, Device::Cpu));
    let (x, y) = VideoClassifier::corrupt(&clips, &labels);
    let mut counts = [0; 3];
    for n in 0..b {
        let frames: Vec<f64> = (0..t).map(|f| x.double_value(&[n, 0, f, 1, 1])).collect();
        let orig: Vec<f64> = (0..t).map(|f| (n * t + f) as f64).collect();
        let mut sorted = frames.clone();
        sorted.sort_by(f64::total_cmp);
        match y.int64_value(&[n]) {
            FROZEN_CLASS => {
                counts[1] += 1;
                assert!(frames.iter().all(|v| *v == frames[0]) && orig.contains(&frames[0]));
            }
            SHUFFLED_CLASS => {
                counts[2] += 1;
                assert_eq!(sorted, orig, "clip {n}: shuffling lost frames");
            }
            label => {
                counts[0] += 1;
                assert_eq!(label, labels.int64_value(&[n]));
                assert_eq!(frames, orig);
            }
        }
    }
    // Two thirds real, a sixth each corrupted (200 draws: wide bounds).
    assert!(
        counts[0] > 100 && counts[1] > 15 && counts[2] > 15,
        "{counts:?}"
    );
}

/// The value the fixture script gives tensor `k` (sorted-name index) of
/// `shape` (see scripts/i3d_fixture.py).
fn formula_value(name: &str, k: usize, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let base = (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.37 + (1.1 * k as f64 + 0.5))
        .sin()
        .view(shape);
    if name.ends_with("running_var") {
        (base + 1.0) * 0.25 + 1.0
    } else if name.ends_with("bn.weight") {
        base * 0.2 + 1.0
    } else if name.ends_with("bias") || name.ends_with("running_mean") {
        base * 0.1
    } else {
        let fan_in: i64 = shape[1..].iter().product();
        base * (2.0 / (fan_in as f64).sqrt())
    }
}

fn formula_clip(shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.013 + 0.2).sin() * 0.9).view(shape)
}

/// The I3D architecture against cd-fvd's PyTorch port (fixture from
/// scripts/i3d_fixture.py): same tensor names and shapes, same last-block
/// output at an awkward input size (odd frames, sides not multiples of the
/// strides: exercises the "SAME" padding), same logits at the FVD size, f64.
#[test]
fn i3d_matches_independent_implementation() {
    let fx = fixture("i3d_fixture.json");
    let names: Vec<String> = serde_json::from_value(fx["names"].clone()).unwrap();
    let shapes: Vec<Vec<i64>> = serde_json::from_value(fx["shapes"].clone()).unwrap();
    let mut net = I3d::new(Device::Cpu);
    let vs = net.var_store();
    vs.double();
    let vars = vs.variables();
    let mut ours: Vec<&String> = vars.keys().collect();
    ours.sort();
    assert_eq!(
        ours,
        names.iter().collect::<Vec<_>>(),
        "tensor names differ"
    );
    tch::no_grad(|| {
        for (k, (name, shape)) in names.iter().zip(&shapes).enumerate() {
            let mut v = vars[name].shallow_clone();
            assert_eq!(&v.size(), shape, "{name}");
            v.copy_(&formula_value(name, k, shape));
        }
    });
    let _guard = tch::no_grad_guard();

    let input: Vec<i64> = serde_json::from_value(fx["pre_pool_input"].clone()).unwrap();
    let pre = net.pre_pool(&formula_clip(&input));
    let want_shape: Vec<i64> = serde_json::from_value(fx["pre_pool_shape"].clone()).unwrap();
    assert_eq!(pre.size(), want_shape);
    let sums: Vec<f64> =
        Vec::try_from(pre.sum_dim_intlist(&[0i64, 2, 3, 4][..], false, Kind::Double)).unwrap();
    let want_sums = floats(&fx["pre_pool_channel_sum"]);
    let flat = pre.flatten(0, -1);
    let picks: Vec<i64> = serde_json::from_value(fx["pre_pool_picks"].clone()).unwrap();
    let got_picks: Vec<f64> =
        Vec::try_from(flat.index_select(0, &Tensor::from_slice(&picks))).unwrap();
    let want_picks = floats(&fx["pre_pool_values"]);
    let err = |a: &[f64], b: &[f64]| {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale
    };
    assert!(
        err(&sums, &want_sums) < 1e-10,
        "channel sums: {}",
        err(&sums, &want_sums)
    );
    assert!(
        err(&got_picks, &want_picks) < 1e-10,
        "values: {}",
        err(&got_picks, &want_picks)
    );
    assert!(
        want_picks.iter().any(|v| v.abs() > 0.1),
        "fixture output is trivially small"
    );

    let input: Vec<i64> = serde_json::from_value(fx["logits_input"].clone()).unwrap();
    let clip = formula_clip(&input);
    let logits: Vec<f64> = Vec::try_from(net.logits(&clip).flatten(0, -1)).unwrap();
    let want = floats(&fx["logits"]);
    assert_eq!(logits.len(), 400);
    assert!(
        err(&logits, &want) < 1e-10,
        "logits: {}",
        err(&logits, &want)
    );
    // The FVD path: features of clips already at 224 are these logits (f32).
    let feats = net.features(&clip).unwrap();
    assert_eq!(feats.size(), [1, 400]);
}
