//! Instruction counts of the data path's CPU work: decoding (the gzipped IDX
//! files of Fashion-MNIST's test split, a JPEG photo) and augmenting (the
//! training pipeline's pad + flip over a batch, ADM's centre crop and resize
//! of a photo). Measured by `cargo xtask bench icount` under callgrind; see
//! `dim_build::icount`. Needs the data `cargo xtask setup` installs.
use std::path::{Path, PathBuf};

use dim_data::rng::Rng;
use dim_data::{decode_rgb, Dataset, IdxDataset, Split, Transform, FASHION_MNIST_DIR};

/// One of the opencv-doc sample photos (Debian `opencv-doc`, 512x480).
const PHOTO: &str = "/usr/share/doc/opencv-doc/examples/data/fruits.jpg";

fn require(p: &str) -> PathBuf {
    let p = Path::new(p).to_path_buf();
    assert!(
        p.exists(),
        "{} is missing: run cargo xtask setup",
        p.display()
    );
    p
}

fn decode_idx() -> Box<dyn FnMut() + Send> {
    let dir = require(FASHION_MNIST_DIR);
    Box::new(move || {
        let ds = IdxDataset::mnist_layout(&dir, Split::Test).expect("fashion-mnist test split");
        std::hint::black_box(ds.len());
    })
}

fn decode_jpeg() -> Box<dyn FnMut() + Send> {
    let photo = require(PHOTO);
    Box::new(move || {
        std::hint::black_box(decode_rgb(&photo).expect("decode").data.len());
    })
}

/// The Fashion-MNIST training pipeline (pad 28 -> 32, random flip) over 256 images.
fn augment_pad_flip() -> Box<dyn FnMut() + Send> {
    let ds =
        IdxDataset::mnist_layout(require(FASHION_MNIST_DIR), Split::Test).expect("fashion-mnist");
    let raws: Vec<_> = (0..256)
        .map(|i| ds.get_raw(i, 0).expect("sample").frames)
        .collect();
    let steps = [
        Transform::Pad { size: 32, value: 0 },
        Transform::RandomFlip { p: 0.5 },
    ];
    Box::new(move || {
        let mut rng = Rng::new(7);
        for f in &raws {
            let mut f = f.clone();
            for t in &steps {
                t.apply(&mut f, &mut rng, "bench").expect("transform");
            }
            std::hint::black_box(&f);
        }
    })
}

/// ADM's centre crop and resize to 256 of a decoded photo.
fn augment_crop_resize() -> Box<dyn FnMut() + Send> {
    let photo = decode_rgb(&require(PHOTO)).expect("decode");
    Box::new(move || {
        let mut f = photo.clone();
        f.center_crop_resize(200);
        std::hint::black_box(&f);
    })
}

fn main() {
    dim_build::icount::main(&[
        ("data_decode_idx_fmnist_test", &decode_idx),
        ("data_decode_jpeg", &decode_jpeg),
        ("data_augment_pad_flip_256", &augment_pad_flip),
        ("data_augment_crop_resize", &augment_crop_resize),
    ]);
}
