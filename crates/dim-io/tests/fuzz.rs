//! Fuzzing the safetensors reader (bounded cases, in the normal test suite):
//! arbitrary bytes, cut and corrupted valid files, and structurally odd
//! headers are errors or valid files, never panics.

use std::collections::BTreeMap;

use dim_io::{save, TensorFile};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

/// Opens `bytes` as a file and reads every tensor; returns whether it opened.
fn open_all(bytes: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.safetensors");
    std::fs::write(&p, bytes).unwrap();
    match TensorFile::open(&p) {
        Err(e) => {
            assert!(e.to_string().contains("f.safetensors"), "{e}");
            false
        }
        Ok(f) => {
            let names: Vec<String> = f.names().map(String::from).collect();
            for n in names {
                let t = f.read(&n).unwrap();
                let meta = f.get(&n).unwrap();
                assert_eq!(t.size(), meta.shape);
                // Byte ranges: the last byte reads, one past the end is an error.
                let len = meta.byte_len();
                let mut one = [0u8; 1];
                if len > 0 {
                    f.read_bytes_at(&n, len - 1, &mut one).unwrap();
                }
                let e = f.read_bytes_at(&n, len, &mut one).unwrap_err();
                assert!(e.to_string().contains("f.safetensors"), "{e}");
            }
            true
        }
    }
}

fn valid_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "x".to_string());
    let tensors = vec![
        (
            "a".to_string(),
            Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]),
        ),
        (
            "b".to_string(),
            Tensor::arange(5, (Kind::Int64, Device::Cpu)),
        ),
        (
            "c".to_string(),
            Tensor::ones([2, 1, 3], (Kind::BFloat16, Device::Cpu)),
        ),
    ];
    save(&p, tensors, &meta).unwrap();
    std::fs::read(p).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        open_all(&bytes);
    }

    #[test]
    fn cut_and_corrupted_files_never_panic(
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    ) {
        let mut bytes = valid_file();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        let n = cut.index(bytes.len() + 1);
        bytes.truncate(n.max(1));
        open_all(&bytes);
    }

    #[test]
    fn odd_headers_never_panic(
        dtype in prop::sample::select(vec!["F32", "F64", "BF16", "U8", "BOOL", "F8_E4M3", "C64", "I128", ""]),
        shape in proptest::collection::vec(0u64..(1u64 << 40), 0..4),
        start in 0u64..64,
        end in 0u64..64,
        data in 0usize..64,
    ) {
        let header = format!(
            r#"{{"t":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{end}]}}}}"#
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        open_all(&bytes);
    }
}

#[test]
fn the_valid_file_opens() {
    assert!(open_all(&valid_file()));
}
