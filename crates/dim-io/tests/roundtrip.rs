//! Save/load round trips, the checked loader's messages, corrupt files.

use std::collections::BTreeMap;

use dim_io::{dtype_of, load_checked, load_into, save, save_bytes, Group, RawTensor, TensorFile};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The error of `r`, which must name every one of `parts`; `what` labels the case.
#[track_caller]
fn fails_naming<T, E: std::fmt::Display>(r: Result<T, E>, parts: &[&str], what: &str) {
    let e = match r {
        Ok(_) => panic!("{what}: no error"),
        Err(e) => e.to_string(),
    };
    for p in parts {
        assert!(e.contains(p), "{what}: `{p}` not in: {e}");
    }
}

fn named(seed: i64) -> Vec<(String, Tensor)> {
    tch::manual_seed(seed);
    vec![
        (
            "a.weight".into(),
            Tensor::randn([7, 3], (Kind::Float, Device::Cpu)),
        ),
        (
            "a.bias".into(),
            Tensor::randn([7], (Kind::BFloat16, Device::Cpu)),
        ),
        (
            "b".into(),
            Tensor::randint(100, [2, 5, 3], (Kind::Int64, Device::Cpu)),
        ),
        (
            "c".into(),
            Tensor::randn([1, 13], (Kind::Double, Device::Cpu)).gt(0.0),
        ),
        (
            "empty".into(),
            Tensor::zeros([0, 4], (Kind::Half, Device::Cpu)),
        ),
    ]
}

#[test]
fn save_then_read_is_exact_for_every_dtype_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("k".to_string(), "v".to_string());
    let ts = named(3);
    save(
        &path,
        ts.iter().map(|(k, t)| (k.clone(), t.shallow_clone())),
        &meta,
    )
    .unwrap();
    let f = TensorFile::open(&path).unwrap();
    assert_eq!(f.metadata(), &meta);
    assert_eq!(f.names().count(), ts.len());
    for (k, t) in &ts {
        let r = f.read(k).unwrap();
        assert_eq!(r.kind(), t.kind(), "{k}");
        assert!(r.equal(t), "{k}");
    }
    // The file is readable by the reference reader too.
    let st = Tensor::read_safetensors(&path).unwrap();
    assert_eq!(st.len(), ts.len());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn checked_loader_names_missing_unexpected_and_misshaped_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let w = root.var("w", &[4, 6], tch::nn::Init::Const(0.0));
    let _v = root.var("v", &[5], tch::nn::Init::Const(0.0));
    let good = Tensor::randn([4, 6], (Kind::Double, Device::Cpu));
    let file = [
        ("w".to_string(), good.shallow_clone()),
        (
            "v".to_string(),
            Tensor::ones([5], (Kind::Float, Device::Cpu)),
        ),
        (
            "head".to_string(),
            Tensor::ones([2], (Kind::Float, Device::Cpu)),
        ),
    ];
    save(
        &path,
        file.iter().map(|(k, t)| (k.clone(), t.shallow_clone())),
        &BTreeMap::new(),
    )
    .unwrap();
    fails_naming(
        load_checked(&vs, &path, &|_| false),
        &["w.safetensors", "unexpected `head`"],
        "extra tensor",
    );
    load_checked(&vs, &path, &|k| k == "head").unwrap();
    // Converted to the variable's dtype.
    assert!(w.allclose(&good.to_kind(Kind::Float), 0.0, 0.0, false));

    let vs2 = VarStore::new(Device::Cpu);
    let _w = vs2.root().var("w", &[4, 7], tch::nn::Init::Const(0.0));
    let _u = vs2.root().var("u", &[1], tch::nn::Init::Const(0.0));
    fails_naming(
        load_checked(&vs2, &path, &|k| k != "v"),
        &[
            "`w` has shape [4, 6] in the file, the network needs [4, 7]",
            "missing `u` [1]",
            "unexpected `v`",
        ],
        "shape, missing and unexpected",
    );
}

#[test]
fn groups_strip_their_prefix_and_fall_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.safetensors");
    let one = || Tensor::ones([3], (Kind::Float, Device::Cpu));
    let file = vec![
        ("model/a".to_string(), one()),
        ("model/buf".to_string(), one() * 2),
        ("ema/a".to_string(), one() * 3),
        ("optim/m/a".to_string(), one() * 4),
    ];
    save(&path, file, &BTreeMap::new()).unwrap();
    let f = TensorFile::open(&path).unwrap();
    let mut targets = BTreeMap::new();
    for name in ["a", "buf"] {
        targets.insert(
            name.to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        );
    }
    load_into(&f, &targets, Group::new("ema/").or("model/")).unwrap();
    assert_eq!(targets["a"].double_value(&[0]), 3.0);
    assert_eq!(targets["buf"].double_value(&[0]), 2.0);
    fails_naming(
        load_into(&f, &targets, Group::new("ema/")),
        &["missing `buf`", "group `ema/`"],
        "group without fallback",
    );
}

#[test]
fn truncated_and_corrupt_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    save(&path, named(5), &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "shorter than the 8-byte header length"),
        ("cut", bytes[..bytes.len() - 3].to_vec(), "truncated"),
        (
            "text",
            b"not a checkpoint at all".to_vec(),
            "does not fit a file",
        ),
        (
            "json",
            {
                let mut b = bytes.clone();
                b[8] = b'#';
                b
            },
            "bad header",
        ),
    ];
    for (name, data, want) in cases {
        let p = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&p, data).unwrap();
        fails_naming(
            TensorFile::open(&p),
            &[&format!("{name}.safetensors"), want],
            name,
        );
    }
    fails_naming(
        TensorFile::open(&dir.path().join("nope.safetensors")),
        &["nope.safetensors", "No such file"],
        "missing file",
    );
}

#[test]
fn save_bytes_writes_what_save_writes_and_checks_data_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
    // Sorted by name: `save` writes in name order, `save_bytes` in the order given.
    let ts: Vec<(String, Tensor)> = {
        let mut v = named(5);
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let from_tensors = dir.path().join("a.safetensors");
    save(
        &from_tensors,
        ts.iter().map(|(k, t)| (k.clone(), t.shallow_clone())),
        &meta,
    )
    .unwrap();
    let raw: Vec<(Vec<usize>, Vec<u8>)> = ts
        .iter()
        .map(|(_, t)| {
            let n = t.numel();
            let mut b = vec![0u8; n * t.kind().elt_size_in_bytes()];
            t.contiguous().copy_data_u8(&mut b, n);
            (t.size().iter().map(|&d| d as usize).collect(), b)
        })
        .collect();
    let rows: Vec<RawTensor<'_>> = ts
        .iter()
        .zip(&raw)
        .map(|((name, t), (shape, bytes))| RawTensor {
            name,
            dtype: dtype_of(t.kind()).unwrap(),
            shape,
            bytes,
        })
        .collect();
    let from_bytes = dir.path().join("b.safetensors");
    save_bytes(&from_bytes, &rows, &meta).unwrap();
    assert_eq!(
        std::fs::read(&from_tensors).unwrap(),
        std::fs::read(&from_bytes).unwrap()
    );
    // A ragged row reads back byte for byte through `read_bytes_at`.
    let f = TensorFile::open(&from_bytes).unwrap();
    for ((name, _), (_, bytes)) in ts.iter().zip(&raw) {
        assert_eq!(&f.read_bytes(name).unwrap(), bytes, "{name}");
        if bytes.len() > 3 {
            let mut mid = vec![0u8; bytes.len() - 3];
            f.read_bytes_at(name, 2, &mut mid).unwrap();
            assert_eq!(&mid[..], &bytes[2..bytes.len() - 1], "{name}");
        }
    }
    // One byte short: an error naming the file and the tensor; nothing written.
    let mut short = rows.clone();
    let cut = &raw[0].1[..raw[0].1.len() - 1];
    short[0].bytes = cut;
    let bad = dir.path().join("c.safetensors");
    fails_naming(
        save_bytes(&bad, &short, &meta),
        &["c.safetensors", &ts[0].0],
        "short data",
    );
    assert!(!bad.exists());
}
