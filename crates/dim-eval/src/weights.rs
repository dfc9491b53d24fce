//! Loading safetensors weights into a `VarStore` with exact name and shape checks.

use std::collections::HashMap;
use std::path::Path;

use tch::nn::VarStore;
use tch::Tensor;

use crate::{EvalError, Result};

/// Copies every variable of `vs` from the safetensors file at `path`.
///
/// Every variable must be present with the same shape; a tensor in the file
/// that matches no variable is an error unless `ignore(name)` is true (e.g.
/// a classifier head that feature extraction does not use). Dtypes are
/// converted to the variable's. The error lists the first offending names.
pub fn load_checked(vs: &mut VarStore, path: &Path, ignore: &dyn Fn(&str) -> bool) -> Result<()> {
    let file = read_tensors(path)?;
    load_checked_tensors(vs, &file, path, ignore)
}

/// Reads every tensor of a safetensors file by name, with an error naming
/// the file when it is missing or unreadable.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(EvalError::Weights {
            path: path.to_path_buf(),
            detail: "no such file (see docs/eval.md for how to make it)".into(),
        });
    }
    Ok(Tensor::read_safetensors(path)
        .map_err(|e| EvalError::Weights {
            path: path.to_path_buf(),
            detail: format!("not a readable safetensors file ({e})"),
        })?
        .into_iter()
        .collect())
}

/// As [`load_checked`], from tensors already read from `path` (and perhaps
/// renamed, e.g. from an older key scheme); `path` names the file in errors.
pub fn load_checked_tensors(
    vs: &mut VarStore,
    file: &HashMap<String, Tensor>,
    path: &Path,
    ignore: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let vars = vs.variables();
    let mut problems = Vec::new();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in &names {
        match file.get(*name) {
            None => problems.push(format!("missing `{name}`")),
            Some(t) if t.size() != vars[*name].size() => problems.push(format!(
                "`{name}` has shape {:?}, the network needs {:?}",
                t.size(),
                vars[*name].size()
            )),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = file
        .keys()
        .filter(|k| !vars.contains_key(*k) && !ignore(k))
        .collect();
    extra.sort();
    problems.extend(extra.iter().map(|k| format!("unexpected `{k}`")));
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(8);
        return Err(EvalError::Weights {
            path: path.to_path_buf(),
            detail: format!(
                "{n} tensor(s) do not match the network: {}{}",
                problems.join(", "),
                if n > 8 { ", ..." } else { "" }
            ),
        });
    }
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vars {
        let src = &file[&name];
        var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
    }
    Ok(())
}
