//! Listing and naming files: the extensions the datasets take, and folder
//! listings in natural order (shared by the image and video datasets).

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// File extensions treated as videos (case-insensitive).
pub const VIDEO_EXTENSIONS: &[&str] = &["mp4", "avi", "mkv", "webm", "mov", "m4v"];
/// File extensions treated as images (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

pub(crate) fn has_extension(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Sort key that orders `frame_2` before `frame_10`.
pub(crate) fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut num: Option<u64> = None;
    for ch in name.chars() {
        if let Some(d) = ch.to_digit(10) {
            num = Some(num.unwrap_or(0).saturating_mul(10).saturating_add(d as u64));
        } else {
            if let Some(n) = num.take() {
                parts.push((std::mem::take(&mut text), n));
            }
            text.push(ch);
        }
    }
    parts.push((text, num.unwrap_or(0)));
    parts
}

pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut v = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name();
        // Hidden files (.DS_Store, editor droppings) are never samples.
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        v.push(entry.path());
    }
    v.sort_by_cached_key(|p| natural_key(&p.file_name().unwrap_or_default().to_string_lossy()));
    Ok(v)
}

pub(crate) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    sorted_entries(dir)
}
