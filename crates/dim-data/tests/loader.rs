//! Loader determinism, resume, sharding and error policies.

mod common;

use std::sync::Arc;

use dim_data::{
    DataError, Dataset, ErrorPolicy, Frames, IdxDataset, Loader, LoaderConfig, LoaderState,
    RawSample, Split, Transform, Transformed,
};

/// A cheap synthetic dataset: sample `i` is a 2x3 image of value `i % 256`,
/// label `i % 10`; listed indices fail (or panic) as a corrupt file would.
struct Synthetic {
    n: usize,
    bad: Vec<usize>,
    panic_at: Option<usize>,
}

impl Dataset for Synthetic {
    fn len(&self) -> usize {
        self.n
    }
    fn get_raw(&self, index: usize, _seed: u64) -> dim_data::Result<RawSample> {
        if self.panic_at == Some(index) {
            panic!("decoder bug on {index}");
        }
        if self.bad.contains(&index) {
            return Err(DataError::corrupt(
                format!("/data/bad-{index}.jpg"),
                "truncated JPEG",
            ));
        }
        Ok(RawSample {
            frames: Frames::image(2, 3, 1, vec![(index % 256) as u8; 6]),
            label: Some(index as i64 % 10),
        })
    }
    fn describe(&self) -> String {
        "synthetic".into()
    }
}

fn synthetic(n: usize) -> Arc<dyn Dataset> {
    Arc::new(Transformed::new(
        Synthetic {
            n,
            bad: vec![],
            panic_at: None,
        },
        vec![Transform::RandomFlip { p: 0.5 }],
    ))
}

fn fashion_test() -> Arc<dyn Dataset> {
    let ds = IdxDataset::mnist_layout(common::fashion_dir(), Split::Test).unwrap();
    Arc::new(Transformed::new(
        ds,
        vec![
            Transform::Pad { size: 32, value: 0 },
            Transform::RandomFlip { p: 0.5 },
        ],
    ))
}

/// (epoch, step, indices, sum of x, labels) of the next `n` batches.
type Seen = (u64, u64, Vec<usize>, f64, Vec<i64>);

fn take(loader: &mut Loader, n: usize) -> Vec<Seen> {
    (0..n)
        .map(|_| {
            let b = loader.next_batch().unwrap().unwrap();
            let y: Vec<i64> = Vec::try_from(b.y.as_ref().unwrap()).unwrap();
            (
                b.epoch,
                b.step,
                b.indices.clone(),
                b.x.sum(tch::Kind::Double).double_value(&[]),
                y,
            )
        })
        .collect()
}

fn cfg(batch: usize, workers: usize, seed: u64) -> LoaderConfig {
    LoaderConfig {
        batch_size: batch,
        workers,
        prefetch: 3,
        seed,
        pin_memory: false,
        ..LoaderConfig::default()
    }
}

#[test]
fn same_seed_same_batches_for_any_worker_count() {
    let ds = fashion_test();
    let reference = take(&mut Loader::new(ds.clone(), cfg(50, 0, 7)).unwrap(), 12);
    for workers in [1, 2, 4] {
        let mut l = Loader::new(
            ds.clone(),
            LoaderConfig {
                prefetch: 1 + workers * 2,
                ..cfg(50, workers, 7)
            },
        )
        .unwrap();
        assert_eq!(take(&mut l, 12), reference, "{workers} workers");
    }
    let other = take(&mut Loader::new(ds.clone(), cfg(50, 2, 8)).unwrap(), 12);
    assert_ne!(other[0].2, reference[0].2);
    // Each batch's x is the stack of the samples the dataset gives for
    // (seed, epoch, index): the flips are decided per sample, not per worker.
    let mut l = Loader::new(ds.clone(), cfg(4, 2, 7)).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    for (row, &i) in b.indices.iter().enumerate() {
        let s = ds.get(i, dim_data::sample_seed(7, 0, i)).unwrap();
        assert!(b.x.get(row as i64).equal(&s.data));
    }
    assert_eq!(b.x.size(), [4, 1, 32, 32]);
}

#[test]
fn epochs_are_permutations_and_differ() {
    let loader = |c: LoaderConfig| Loader::new(synthetic(103), c).unwrap();
    let mut l = loader(LoaderConfig {
        drop_last: false,
        ..cfg(10, 2, 3)
    });
    assert_eq!(l.batches_per_epoch(), 11);
    let e0: Vec<usize> = l.epoch_batches().flat_map(|b| b.unwrap().indices).collect();
    let e1: Vec<usize> = l.epoch_batches().flat_map(|b| b.unwrap().indices).collect();
    assert_ne!(e0, e1);
    for e in [&e0, &e1] {
        let mut s = e.clone();
        s.sort();
        assert_eq!(s, (0..103).collect::<Vec<_>>());
    }
    assert_eq!(l.position().epoch, 2);
    // drop_last drops the short batch; shuffle = false keeps file order.
    let mut l = loader(LoaderConfig {
        shuffle: false,
        ..cfg(10, 1, 3)
    });
    let e: Vec<Vec<usize>> = l.epoch_batches().map(|b| b.unwrap().indices).collect();
    assert_eq!(e.len(), 10);
    assert_eq!(e[3], (30..40).collect::<Vec<_>>());
}

#[test]
fn resume_yields_exactly_the_uninterrupted_batches() {
    let ds = fashion_test();
    // 10000 / 300 = 33 batches per epoch; run across an epoch boundary.
    let full = take(&mut Loader::new(ds.clone(), cfg(300, 2, 11)).unwrap(), 45);
    for stop in [0usize, 5, 33, 40] {
        let mut first = Loader::new(ds.clone(), cfg(300, 2, 11)).unwrap();
        let head = take(&mut first, stop);
        // The state survives serialisation (it goes into checkpoints).
        let json = serde_json::to_string(&first.position()).unwrap();
        drop(first);
        let state: LoaderState = serde_json::from_str(&json).unwrap();
        let mut second = Loader::new(ds.clone(), cfg(300, 3, 11)).unwrap();
        // Prefetch something first: resume must discard it.
        take(&mut second, 2);
        second.resume(&state).unwrap();
        let tail = take(&mut second, 45 - stop);
        assert_eq!([head, tail].concat(), full, "stop at {stop}");
    }
    let mut l = Loader::new(ds.clone(), cfg(300, 1, 11)).unwrap();
    let wrong = LoaderState {
        seed: 12,
        ..l.position()
    };
    assert!(l.resume(&wrong).unwrap_err().to_string().contains("seed"));
}

#[test]
fn ranks_partition_each_epoch() {
    let n = 100;
    let mut all = Vec::new();
    for rank in 0..3 {
        let mut l = Loader::new(
            synthetic(n),
            LoaderConfig {
                rank,
                world_size: 3,
                ..cfg(11, 1, 5)
            },
        )
        .unwrap();
        assert_eq!(l.batches_per_epoch(), 3); // 33 per rank, drop_last
        let idx: Vec<usize> = l.epoch_batches().flat_map(|b| b.unwrap().indices).collect();
        assert_eq!(idx.len(), 33);
        all.extend(idx);
    }
    let mut s = all.clone();
    s.sort();
    s.dedup();
    assert_eq!(s.len(), 99, "ranks overlap");
    let e = Loader::new(
        synthetic(10),
        LoaderConfig {
            rank: 3,
            world_size: 3,
            ..cfg(2, 0, 0)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("loader.rank"), "{e}");
}

/// An unshuffled loader (batches of 5, 2 workers) over `n` synthetic
/// samples of which `bad` fail and `panic_at` panics.
fn faulty_loader(
    n: usize,
    bad: Vec<usize>,
    panic_at: Option<usize>,
    on_error: ErrorPolicy,
) -> Loader {
    let ds = Arc::new(Synthetic { n, bad, panic_at });
    let c = LoaderConfig {
        shuffle: false,
        on_error,
        ..cfg(5, 2, 0)
    };
    Loader::new(ds, c).unwrap()
}

#[test]
fn stop_policy_reports_the_file_and_ends() {
    let mut l = faulty_loader(40, vec![13], None, ErrorPolicy::Stop);
    for _ in 0..2 {
        assert!(l.next_batch().unwrap().is_ok());
    }
    let e = l.next_batch().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("/data/bad-13.jpg") && e.contains("truncated"),
        "{e}"
    );
    assert!(l.next_batch().is_none());
}

#[test]
fn skip_policy_drops_and_counts_bad_samples() {
    let mut l = faulty_loader(40, vec![3, 4, 17], None, ErrorPolicy::Skip);
    let batches: Vec<_> = l.epoch_batches().map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 8);
    assert_eq!(batches[0].indices, [0, 1, 2]);
    assert_eq!(batches[0].x.size()[0], 3);
    assert_eq!(
        batches.iter().map(|b| b.skipped).collect::<Vec<_>>(),
        [2, 0, 0, 1, 0, 0, 0, 0]
    );
    assert_eq!(batches[3].indices, [15, 16, 18, 19]);
    let y: Vec<i64> = Vec::try_from(batches[3].y.as_ref().unwrap()).unwrap();
    assert_eq!(y, [5, 6, 8, 9]);
    assert_eq!(l.skipped(), 3);
}

#[test]
fn a_panicking_sample_is_an_error_not_a_hang() {
    let mut l = faulty_loader(20, vec![], Some(7), ErrorPolicy::Stop);
    assert!(l.next_batch().unwrap().is_ok());
    let e = l.next_batch().unwrap().unwrap_err().to_string();
    assert!(e.contains("panic") && e.contains("decoder bug on 7"), "{e}");
}

#[test]
fn too_small_dataset_is_a_clear_error() {
    let e = Loader::new(synthetic(3), cfg(4, 1, 0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 samples") && e.contains("batch_size"), "{e}");
}
