//! Every `[data]` and `[loader]` table of the repository's configs parses
//! and validates with this crate's types (building is not attempted: their
//! data sets are not installed here).

mod common;

use dim_data::{DataConfig, LoaderConfig};

#[test]
fn repository_configs_parse_and_validate() {
    let dir = common::workspace_root().join("configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let doc: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if doc.contains_key("data") {
            DataConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
        if let Some(l) = doc.get("loader") {
            let l: LoaderConfig = l
                .clone()
                .try_into()
                .unwrap_or_else(|e| panic!("{}: [loader]: {e}", path.display()));
            l.validate("loader").unwrap();
        }
    }
    assert!(
        checked > 0,
        "no config with a [data] table under {}",
        dir.display()
    );
}
