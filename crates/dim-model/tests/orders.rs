//! Scan orders: each layer order is a permutation of the token grid whose
//! inverse view restores the tokens, it matches the axis nesting written
//! out with loops, the cyclic video order puts every spatial and temporal
//! neighbour pair next to each other in some layer, and image models refuse
//! video orders.

use dim_model::network::{frame_major_view, scan_order, scan_permutation};
use dim_model::{LayerOrder, ModelConfig, TokenGrid, TokenOrder};
use tch::{Device, Kind, Tensor};

const LAYER_ORDERS: [LayerOrder; 3] = [
    LayerOrder::FrameMajor,
    LayerOrder::ColumnMajor,
    LayerOrder::Interleaved,
];

/// Awkward grids: prime sides, single frames, single rows and columns.
fn grids() -> Vec<TokenGrid> {
    [
        (3, 2, 5),
        (1, 3, 7),
        (4, 1, 3),
        (2, 5, 1),
        (5, 3, 2),
        (1, 1, 1),
    ]
    .into_iter()
    .map(|(frames, rows, cols)| TokenGrid {
        batch: 2,
        frames,
        rows,
        cols,
    })
    .collect()
}

/// The order's scan sequence by its definition: nested loops over the axes,
/// outermost first, yielding frame-major indices `t·H·W + h·W + w`.
fn by_definition(g: &TokenGrid, order: LayerOrder) -> Vec<i64> {
    let (t_n, h_n, w_n) = (g.frames, g.rows, g.cols);
    let idx = |t: i64, h: i64, w: i64| (t * h_n + h) * w_n + w;
    let mut out = Vec::new();
    match order {
        LayerOrder::FrameMajor => {
            for t in 0..t_n {
                for h in 0..h_n {
                    for w in 0..w_n {
                        out.push(idx(t, h, w));
                    }
                }
            }
        }
        LayerOrder::ColumnMajor => {
            for t in 0..t_n {
                for w in 0..w_n {
                    for h in 0..h_n {
                        out.push(idx(t, h, w));
                    }
                }
            }
        }
        LayerOrder::Interleaved => {
            for h in 0..h_n {
                for w in 0..w_n {
                    for t in 0..t_n {
                        out.push(idx(t, h, w));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_order_is_a_permutation_and_its_inverse_restores_the_tokens() {
    tch::manual_seed(0);
    for g in grids() {
        for order in LAYER_ORDERS {
            let perm = Vec::<i64>::try_from(scan_permutation(&g, order)).unwrap();
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..g.len()).collect::<Vec<_>>(),
                "{order:?} {g:?}: not a permutation"
            );
            assert_eq!(perm, by_definition(&g, order), "{order:?} {g:?}");
            // Fresh tokens through the gather and back through the inverse view.
            let x = Tensor::randn([g.batch, g.len(), 6], (Kind::Double, Device::Cpu));
            let scanned = scan_order(&x, &g, order);
            assert!(
                scanned.equal(&x.index_select(1, &Tensor::from_slice(&perm))),
                "{order:?} {g:?}: gather differs from the permutation"
            );
            let back = frame_major_view(&scanned, &g, order).reshape(x.size());
            assert!(back.equal(&x), "{order:?} {g:?}: inverse does not restore");
        }
    }
}

/// Every pair of grid neighbours (along T, H and W) and whether some layer
/// of a `depth`-layer model scanning in `order` puts it side by side
/// (the bidirectional scan covers both directions of an adjacency).
fn unreached_pairs(g: &TokenGrid, order: TokenOrder, depth: usize) -> Vec<(i64, i64)> {
    let positions: Vec<Vec<i64>> = (0..depth)
        .map(|layer| {
            let perm = Vec::<i64>::try_from(scan_permutation(g, order.for_layer(layer))).unwrap();
            let mut pos = vec![0; perm.len()];
            for (p, &tok) in perm.iter().enumerate() {
                pos[tok as usize] = p as i64;
            }
            pos
        })
        .collect();
    let (t_n, h_n, w_n) = (g.frames, g.rows, g.cols);
    let idx = |t: i64, h: i64, w: i64| ((t * h_n + h) * w_n + w) as usize;
    let mut missing = Vec::new();
    for t in 0..t_n {
        for h in 0..h_n {
            for w in 0..w_n {
                let a = idx(t, h, w);
                let mut nbrs = Vec::new();
                if t + 1 < t_n {
                    nbrs.push(idx(t + 1, h, w));
                }
                if h + 1 < h_n {
                    nbrs.push(idx(t, h + 1, w));
                }
                if w + 1 < w_n {
                    nbrs.push(idx(t, h, w + 1));
                }
                for b in nbrs {
                    if !positions.iter().any(|pos| (pos[a] - pos[b]).abs() == 1) {
                        missing.push((a as i64, b as i64));
                    }
                }
            }
        }
    }
    missing
}

#[test]
fn row_column_time_makes_every_neighbour_pair_adjacent() {
    for g in grids() {
        // Any depth that completes the three-layer cycle; DiM-S has 12 layers.
        for depth in [3, 12] {
            let missing = unreached_pairs(&g, TokenOrder::RowColumnTime, depth);
            assert!(missing.is_empty(), "{g:?} depth {depth}: {missing:?}");
        }
    }
    // The checker itself sees the gaps the older orders leave on a real grid.
    let g = TokenGrid {
        batch: 1,
        frames: 3,
        rows: 4,
        cols: 5,
    };
    for (order, what) in [
        (TokenOrder::Alternating, "vertical"),
        (TokenOrder::RowColumn, "temporal"),
        (TokenOrder::FrameMajor, "vertical and temporal"),
    ] {
        assert!(
            !unreached_pairs(&g, order, 12).is_empty(),
            "{order:?} should miss {what} neighbours"
        );
    }
    // Images: row_column reaches every neighbour of a frame.
    let img = TokenGrid { frames: 1, ..g };
    assert!(unreached_pairs(&img, TokenOrder::RowColumn, 2).is_empty());
}

#[test]
fn image_models_reject_video_orders_and_factorised_attention() {
    for order in ["row_column_time", "interleaved", "alternating"] {
        let text = format!("preset = \"DiM-S/2\"\ntoken_order = \"{order}\"");
        let msg = ModelConfig::from_toml_str(&text).unwrap_err().to_string();
        assert!(
            msg.contains("token_order") && msg.contains(order) && msg.contains("image model"),
            "{order}: {msg}"
        );
        // The same order is fine for a video model.
        let video = format!("{text}\nframes = 4\ntemporal_patch = 2");
        ModelConfig::from_toml_str(&video).unwrap_or_else(|e| panic!("{order}: {e}"));
    }
    for order in ["row_column", "frame_major"] {
        ModelConfig::from_toml_str(&format!("preset = \"DiM-S/2\"\ntoken_order = \"{order}\""))
            .unwrap();
    }
    let msg = ModelConfig::from_toml_str("preset = \"DiT-S/2\"\nattention = \"factorised\"")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("attention") && msg.contains("image model"),
        "{msg}"
    );
    // A config built in code is checked by validate() too.
    let mut cfg = ModelConfig::preset("DiM-S/2").unwrap();
    cfg.token_order = TokenOrder::Alternating;
    assert!(cfg.validate().is_err());
}

#[test]
fn video_models_default_to_row_column_time() {
    let video =
        ModelConfig::from_toml_str("preset = \"DiM-S/2\"\nframes = 8\ntemporal_patch = 2").unwrap();
    assert_eq!(video.token_order, TokenOrder::RowColumnTime);
    let image = ModelConfig::from_toml_str("preset = \"DiM-S/2\"").unwrap();
    assert_eq!(image.token_order, TokenOrder::RowColumn);
    // The full TOML form round-trips the new fields.
    let mut dit = ModelConfig::preset("DiT-S/2").unwrap();
    dit.frames = 8;
    dit.temporal_patch = 2;
    dit.attention = dim_model::AttentionKind::Factorised;
    dit.validate().unwrap();
    assert_eq!(
        ModelConfig::from_toml_str(&dit.to_toml_string()).unwrap(),
        dit
    );
}

/// Every `[model]` table of the repository's configs parses and validates;
/// the video ones scan `row_column_time` (DiM) and DiT's are full attention.
#[test]
fn repository_model_tables_parse_and_video_ones_use_the_cyclic_order() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut videos = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let doc: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let Some(model) = doc.get("model") else {
            continue;
        };
        let cfg = ModelConfig::from_toml_str(&toml::to_string(model).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if cfg.is_video() {
            videos += 1;
            assert_eq!(
                cfg.token_order,
                TokenOrder::RowColumnTime,
                "{}",
                path.display()
            );
            assert_eq!(
                cfg.attention,
                dim_model::AttentionKind::Full,
                "{}",
                path.display()
            );
        }
    }
    assert!(
        videos >= 4,
        "expected the video configs under {}",
        dir.display()
    );
}
