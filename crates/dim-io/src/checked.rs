//! The one weight loader: names and shapes checked both ways, then tensors
//! copied one at a time into their targets.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::nn::VarStore;
use tch::Tensor;

use crate::error::{IoError, Result};
use crate::file::TensorFile;

/// At most this many problems are spelled out in a mismatch error.
const SHOWN: usize = 64;

/// Which tensors of a file feed the targets of [`load_into`].
///
/// Target `name` reads `prefix + name`, or `fallback + name` when the file
/// has no such tensor (e.g. EMA weights that hold trainable tensors only,
/// with the buffers under the model's group). Tensors under `prefix` that
/// match no target are an error unless `ignore(name)` (name without the
/// prefix) is true.
#[derive(Clone, Copy)]
pub struct Group<'a> {
    prefix: &'a str,
    fallback: Option<&'a str>,
    ignore: &'a dyn Fn(&str) -> bool,
}

impl std::fmt::Debug for Group<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("prefix", &self.prefix)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl<'a> Group<'a> {
    /// The tensors whose names start with `prefix` (`""`: all of them).
    pub fn new(prefix: &'a str) -> Self {
        Self {
            prefix,
            fallback: None,
            ignore: &|_| false,
        }
    }

    /// Targets missing under the prefix are read from `fallback` instead.
    pub fn or(mut self, fallback: &'a str) -> Self {
        self.fallback = Some(fallback);
        self
    }

    /// Tensors of the group for which `ignore` is true need no target.
    pub fn ignoring(mut self, ignore: &'a dyn Fn(&str) -> bool) -> Self {
        self.ignore = ignore;
        self
    }
}

/// Copies tensors of `file` into `targets` (name → tensor of any device and
/// dtype; values are converted to the target's). First every name and shape
/// is checked; the error lists the missing, unexpected and mis-shaped
/// tensors. Then one tensor at a time is read and copied, so the extra
/// memory is one tensor.
pub fn load_into(
    file: &TensorFile,
    targets: &BTreeMap<String, Tensor>,
    group: Group<'_>,
) -> Result<()> {
    let source = Source {
        path: file.path(),
        names: &mut file.names(),
        shape: &|n| file.get(n).map(|m| m.shape.clone()),
        read: &|n| file.read(n),
    };
    load_checked_from(source, targets, group)
}

/// [`load_into`] from tensors already in memory (e.g. a file whose keys were
/// renamed from an older naming scheme); `path` names their file in errors.
pub fn load_map(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    targets: &BTreeMap<String, Tensor>,
    group: Group<'_>,
) -> Result<()> {
    let source = Source {
        path,
        names: &mut tensors.keys().map(String::as_str),
        shape: &|n| tensors.get(n).map(Tensor::size),
        read: &|n| Ok(tensors[n].shallow_clone()),
    };
    load_checked_from(source, targets, group)
}

/// Reads every tensor of a safetensors file into memory, one at a time.
pub fn read_all(path: &Path) -> Result<HashMap<String, Tensor>> {
    let file = TensorFile::open(path)?;
    file.names()
        .map(|n| Ok((n.to_string(), file.read(n)?)))
        .collect()
}

/// Where [`load_checked_from`] finds tensors: their names, shapes and values.
struct Source<'s, 'n> {
    path: &'s Path,
    names: &'s mut dyn Iterator<Item = &'n str>,
    shape: &'s dyn Fn(&str) -> Option<Vec<i64>>,
    read: &'s dyn Fn(&str) -> Result<Tensor>,
}

/// The checks and copies of [`load_into`] and [`load_map`].
fn load_checked_from(
    source: Source<'_, '_>,
    targets: &BTreeMap<String, Tensor>,
    group: Group<'_>,
) -> Result<()> {
    let mut problems = Vec::new();
    let mut plan = Vec::with_capacity(targets.len());
    for (name, dst) in targets {
        let found = std::iter::once(group.prefix)
            .chain(group.fallback)
            .map(|p| format!("{p}{name}"))
            .find_map(|n| (source.shape)(&n).map(|s| (n, s)));
        match found {
            None => problems.push(format!("missing `{name}` {:?}", dst.size())),
            Some((src, have)) => {
                if have != dst.size() {
                    problems.push(format!(
                        "`{name}` has shape {have:?} in the file, the network needs {:?}",
                        dst.size()
                    ));
                } else {
                    plan.push((src, dst));
                }
            }
        }
    }
    let mut unexpected: Vec<String> = source
        .names
        .filter_map(|name| name.strip_prefix(group.prefix))
        .filter(|short| !targets.contains_key(*short) && !(group.ignore)(short))
        .map(|short| format!("unexpected `{short}`"))
        .collect();
    unexpected.sort();
    problems.extend(unexpected);
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(SHOWN);
        let group_name = if group.prefix.is_empty() {
            String::new()
        } else {
            format!(" (group `{}`)", group.prefix)
        };
        return Err(IoError::Mismatch {
            path: source.path.to_path_buf(),
            detail: format!(
                "{n} tensor(s){group_name} do not match the network (it comes from another architecture or size: use the config it was made with):\n  {}{}",
                problems.join("\n  "),
                if n > SHOWN { "\n  ..." } else { "" }
            ),
        });
    }
    let _guard = tch::no_grad_guard();
    for (src, dst) in plan {
        let value = (source.read)(&src)?;
        dst.shallow_clone()
            .f_copy_(&value)
            .map_err(|e| IoError::Torch {
                path: source.path.to_path_buf(),
                source: e,
            })?;
    }
    Ok(())
}

/// Loads every variable of `vs` from the safetensors file `path` (names as
/// in the store, no prefix), checking names and shapes both ways; tensors
/// for which `ignore(name)` is true may be in the file without a variable
/// (e.g. a classifier head that feature extraction does not use).
pub fn load_checked(vs: &VarStore, path: &Path, ignore: &dyn Fn(&str) -> bool) -> Result<()> {
    let file = TensorFile::open(path)?;
    let targets: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    load_into(&file, &targets, Group::new("").ignoring(ignore))
}
