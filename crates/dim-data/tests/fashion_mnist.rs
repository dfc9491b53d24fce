//! Fashion-MNIST from the Debian package, and Moving Fashion-MNIST.

mod common;

use dim_data::{
    DataConfig, Dataset, IdxDataset, MovingConfig, MovingFashionMnist, Split, Transform,
    Transformed,
};

#[test]
fn fashion_mnist_counts_histogram_and_checksum() {
    let dir = common::fashion_dir();
    // Reference values computed independently with Python's gzip module over
    // the same Debian files: image count, per-class label counts, the sum of
    // every pixel byte, and the first label.
    for (split, n, per_class, pixel_sum) in [
        (Split::Train, 60_000usize, 6_000usize, 3_431_114_169u64),
        (Split::Test, 10_000, 1_000, 573_469_082),
    ] {
        let ds = IdxDataset::mnist_layout(&dir, split).unwrap();
        assert_eq!(ds.len(), n);
        assert_eq!(ds.image_size(), (28, 28));
        assert_eq!(ds.num_classes(), Some(10));
        let mut hist = [0usize; 10];
        let mut sum = 0u64;
        for i in 0..n {
            hist[ds.label(i).unwrap() as usize] += 1;
            sum += ds.pixels(i).iter().map(|&p| p as u64).sum::<u64>();
        }
        assert_eq!(hist, [per_class; 10], "{split:?}");
        assert_eq!(sum, pixel_sum, "{split:?}");
        assert_eq!(ds.label(0), Some(9));
    }
}

#[test]
fn fashion_mnist_config_pads_to_32_in_range() {
    let cfg = DataConfig::from_toml_str(
        "kind = \"fashion_mnist\"\nsplit = \"test\"\ntransforms = [{ op = \"pad\", size = 32 }, { op = \"random_flip\", p = 0.5 }]",
    )
    .unwrap();
    let ds = cfg.build().unwrap();
    let s = ds.get(0, 1).unwrap();
    assert_eq!(s.data.size(), [1, 32, 32]);
    assert_eq!(s.label, Some(9));
    let (min, max) = (
        s.data.min().double_value(&[]),
        s.data.max().double_value(&[]),
    );
    assert!((-1.0..=1.0).contains(&min) && (-1.0..=1.0).contains(&max));
    // The padded border is black (-1).
    assert_eq!(s.data.double_value(&[0, 0, 0]), -1.0);
    assert_eq!(s.data.double_value(&[0, 31, 31]), -1.0);
    // Flip decisions depend on the seed; over many seeds both outcomes occur
    // and each equals the unflipped or mirrored image.
    let plain = ds.get(0, 0).unwrap().data;
    let mirrored = plain.flip([2]);
    let mut flips = 0;
    for seed in 0..40 {
        let d = ds.get(0, seed).unwrap().data;
        if d.equal(&mirrored) {
            flips += 1;
        } else {
            assert!(d.equal(&plain));
        }
    }
    assert!((5..35).contains(&flips), "{flips} flips of 40");
}

#[test]
fn moving_fashion_mnist_is_deterministic_bounded_and_cacheable() {
    let source = IdxDataset::mnist_layout(common::fashion_dir(), Split::Train).unwrap();
    let cfg = MovingConfig {
        len: 20,
        frames: 10,
        ..MovingConfig::default()
    };
    let generator = |c: MovingConfig| MovingFashionMnist::new(source.clone(), c).unwrap();
    let gen = generator(cfg.clone());
    let s = gen.get(3, 0).unwrap();
    assert_eq!(s.data.size(), [1, 10, 64, 64]);
    // Same (seed, index): same clip, whatever the per-access seed.
    assert!(s.data.equal(&gen.get(3, 99).unwrap().data));
    assert!(!s.data.equal(&gen.get(4, 0).unwrap().data));
    let other_seed = generator(MovingConfig {
        seed: 1,
        ..cfg.clone()
    });
    assert!(!s.data.equal(&other_seed.get(3, 0).unwrap().data));

    // Independent check of the item drawing: with one item, every frame
    // holds exactly the source image's bytes (pixel multiset) somewhere in the
    // canvas, since items never leave it.
    let one = generator(MovingConfig {
        items: 1,
        ..cfg.clone()
    });
    let (frames, label) = one.generate(5);
    let ink: u64 = frames.data[..64 * 64].iter().map(|&v| v as u64).sum();
    for t in 0..10 {
        let f = &frames.data[t * 4096..(t + 1) * 4096];
        assert_eq!(f.iter().map(|&v| v as u64).sum::<u64>(), ink, "frame {t}");
    }
    assert!((0..10).contains(&label));
    // Motion: not all frames are equal.
    assert_ne!(frames.data[..4096], frames.data[9 * 4096..]);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mfm.safetensors");
    let cached = MovingFashionMnist::with_cache(source.clone(), cfg.clone(), &path).unwrap();
    assert!(path.exists());
    for i in [0, 7, 19] {
        let (a, b) = (gen.get(i, 0).unwrap(), cached.get(i, 0).unwrap());
        assert!(a.data.equal(&b.data));
        assert_eq!(a.label, b.label);
    }
    // Reopening reads the cache; other settings are refused with the path.
    MovingFashionMnist::with_cache(source.clone(), cfg.clone(), &path).unwrap();
    let e = MovingFashionMnist::with_cache(source, MovingConfig { frames: 5, ..cfg }, &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mfm.safetensors") && e.contains("settings"),
        "{e}"
    );
}

#[test]
fn transformed_pipeline_on_idx_images() {
    let ds = IdxDataset::mnist_layout(common::fashion_dir(), Split::Test).unwrap();
    let t = Transformed::new(ds, vec![Transform::CenterCropResize { size: 16 }]);
    let s = t.get(10, 0).unwrap();
    assert_eq!(s.data.size(), [1, 16, 16]);
}
