//! The harness of the instruction-count benchmarks (`benches/icount_*.rs`,
//! `harness = false`), which `cargo xtask bench icount` runs under
//! valgrind's callgrind. Wall time on shared 2-core CI machines is noise;
//! the number of instructions a case executes is not.
//!
//! A bench's `main` calls [`main`] with its cases. Each case is a setup
//! closure (not counted) returning the closure to count. Arguments:
//!
//! - `--list`: print the case names, one a line;
//! - `--case NAME`: set up that case and run it once inside
//!   [`dim_icount_measured`], the one function callgrind collects in
//!   (`--collect-atstart=no --toggle-collect=dim_icount_measured`);
//! - anything else (`cargo bench`, `cargo test --benches`): run every case once,
//!   natively, as a smoke test.
//!
//! The counted closure runs on one thread (a one-thread rayon pool, so
//! rayon-parallel code stays on the thread callgrind collects on; libtorch
//! gets `OMP_NUM_THREADS=1` from the driver).

/// A case: its name and its setup, which returns the work to count.
pub type Case<'a> = (&'a str, &'a dyn Fn() -> Box<dyn FnMut() + Send>);

/// Runs `f` once: the only function whose instructions callgrind counts.
#[no_mangle]
#[inline(never)]
pub fn dim_icount_measured(f: &mut (dyn FnMut() + Send)) {
    f();
    std::hint::black_box(());
}

/// Runs `f` on a one-thread pool, counted.
fn measured(f: &mut (dyn FnMut() + Send)) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread rayon pool");
    pool.install(|| dim_icount_measured(f));
}

/// The bench's entry point (see the module docs).
pub fn main(cases: &[Case<'_>]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in cases {
            println!("{name}");
        }
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let want = args.get(i + 1).map(String::as_str).unwrap_or_default();
        let Some((_, setup)) = cases.iter().find(|(n, _)| *n == want) else {
            eprintln!(
                "no case `{want}`; cases: {}",
                cases.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
            );
            std::process::exit(2);
        };
        let mut run = setup();
        measured(&mut run);
        return;
    }
    for (name, setup) in cases {
        let mut run = setup();
        let t = std::time::Instant::now();
        measured(&mut run);
        println!("icount case {name}: ran in {:.1} ms (count its instructions with `cargo xtask bench icount`)", t.elapsed().as_secs_f64() * 1e3);
    }
}
