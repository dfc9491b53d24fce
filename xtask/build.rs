//! Embeds the DejaVu Sans font (Debian `fonts-dejavu-core`, installed by
//! `cargo xtask setup`) for the plots of `repro` reports, so the binary
//! draws text on machines without fonts (the experiment bundle). Before setup
//! has installed it, xtask builds without it and plotting says so.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(xtask_font)");
    println!("cargo:rerun-if-changed={FONT}");
    if std::path::Path::new(FONT).is_file() {
        println!("cargo:rustc-cfg=xtask_font");
        println!("cargo:rustc-env=XTASK_FONT={FONT}");
    }
}
