//! The start of every GPU bench: run, skip visibly, or fail. Outside the GPU
//! bundle (`cargo bench` on a machine without a GPU) a bench that cannot run
//! says so and exits 0; inside it (`run.sh` sets `DIM_EXPECT_GPU`) a missing
//! GPU or kernel is a failure, so the bundle never reports "ok" for a bench
//! that did not run.

/// Whether bench `name` can run: `missing` is `None` when it can, else what
/// is missing (e.g. "no CUDA device"). Panics (a non-zero exit) when it
/// cannot and `DIM_EXPECT_GPU` is set.
pub fn runs(name: &str, missing: Option<&str>) -> bool {
    let Some(what) = missing else {
        return true;
    };
    assert!(
        std::env::var_os("DIM_EXPECT_GPU").is_none(),
        "{name}: {what}, and DIM_EXPECT_GPU is set (the GPU bundle): failing instead of skipping"
    );
    println!("{name}: skipped: {what}");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_or_skips() {
        // The variable is set only inside the GPU bundle.
        assert!(std::env::var_os("DIM_EXPECT_GPU").is_none());
        assert!(runs("b", None));
        assert!(!runs("b", Some("no CUDA device")));
    }
}
