//! Prints every preset's parameter count and forward cost at 32×32 latents
//! (256×256 images through the SD VAE), from the closed forms.
//!
//! `cargo run -p dim-model --example counts`

use dim_model::ModelConfig;

fn main() -> Result<(), dim_model::ModelError> {
    println!("| preset | params (M) | tokens | GMACs | GFLOPs |");
    println!("|---|---:|---:|---:|---:|");
    for name in ModelConfig::preset_names() {
        let cfg = ModelConfig::preset(&name)?;
        let shape = [1, cfg.in_channels, cfg.input_size[0], cfg.input_size[1]];
        let g = cfg.token_grid(&shape)?;
        let f = cfg.flops(&shape)?;
        println!(
            "| {name} | {:.1} | {} | {:.2} | {:.2} |",
            cfg.param_count() as f64 / 1e6,
            g.len(),
            f.gmacs(),
            f.gflops()
        );
    }
    Ok(())
}
