//! Writing samples: PNG images and grids, GIF animations and frame strips.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, ImageBuffer, Rgba, RgbaImage};
use tch::{Device, Kind, Tensor};

/// `(N, C, H, W)` in `[-1, 1]` → `(N, H, W, 4)` RGBA bytes on the CPU
/// (grey is replicated, alpha opaque).
fn to_rgba(x: &Tensor) -> Result<Tensor> {
    let s = x.size();
    if s.len() != 4 || !(s[1] == 1 || s[1] == 3) {
        bail!("expected images (N, 1|3, H, W), got {s:?}");
    }
    let x = ((x
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .clamp(-1.0, 1.0)
        + 1.0)
        * 127.5)
        .round()
        .to_kind(Kind::Uint8);
    let x = if s[1] == 1 { x.repeat([1, 3, 1, 1]) } else { x };
    let alpha = Tensor::full([s[0], 1, s[2], s[3]], 255, (Kind::Uint8, Device::Cpu));
    Ok(Tensor::cat(&[x, alpha], 1)
        .permute([0, 2, 3, 1])
        .contiguous())
}

/// `(N, 1|3, H, W)` in `[-1, 1]` → `(N, H, W, 3)` uint8 on the CPU, rounded
/// as the PNGs are (the ADM evaluator's sample-batch layout).
pub fn to_nhwc_u8(x: &Tensor) -> Result<Tensor> {
    Ok(to_rgba(x)?.narrow(3, 0, 3).contiguous())
}

fn image_from(rgba: &Tensor) -> RgbaImage {
    let s = rgba.size();
    let mut buf = vec![0u8; rgba.numel()];
    rgba.copy_data_u8(&mut buf, rgba.numel());
    ImageBuffer::<Rgba<u8>, _>::from_raw(s[1] as u32, s[0] as u32, buf)
        .expect("buffer sized from the tensor")
}

/// Tiles `(N, C, H, W)` images in `[-1, 1]` into one `(H', W', 4)` image with
/// `ncol` columns and a 2-pixel border.
pub fn grid(x: &Tensor, ncol: i64) -> Result<RgbaImage> {
    let rgba = to_rgba(x)?;
    let s = rgba.size();
    let (n, h, w) = (s[0], s[1], s[2]);
    let ncol = ncol.clamp(1, n.max(1));
    let nrow = (n + ncol - 1) / ncol;
    let pad = 2;
    let canvas = Tensor::full(
        [nrow * (h + pad) + pad, ncol * (w + pad) + pad, 4],
        255,
        (Kind::Uint8, Device::Cpu),
    );
    for i in 0..n {
        let (r, c) = (i / ncol, i % ncol);
        canvas
            .narrow(0, pad + r * (h + pad), h)
            .narrow(1, pad + c * (w + pad), w)
            .copy_(&rgba.get(i));
    }
    Ok(image_from(&canvas))
}

fn save(img: &RgbaImage, path: &Path) -> Result<()> {
    img.save(path)
        .with_context(|| format!("cannot write {} (is the folder writable?)", path.display()))
}

/// Writes each image `(N, C, H, W)` as `<dir>/<prefix><index>.png` (index
/// from `first`) and returns how many were written.
pub fn save_pngs(x: &Tensor, dir: &Path, prefix: &str, first: usize) -> Result<usize> {
    let rgba = to_rgba(x)?;
    for i in 0..rgba.size()[0] {
        save(
            &image_from(&rgba.get(i)),
            &dir.join(format!("{prefix}{:06}.png", first + i as usize)),
        )?;
    }
    Ok(rgba.size()[0] as usize)
}

/// Writes a grid PNG of `(N, C, H, W)` images.
pub fn save_grid(x: &Tensor, ncol: i64, path: &Path) -> Result<()> {
    save(&grid(x, ncol)?, path)
}

/// Writes a video `(C, T, H, W)` in `[-1, 1]` as an endlessly looping GIF.
pub fn save_gif(video: &Tensor, fps: u32, path: &Path) -> Result<()> {
    let frames = to_rgba(&video.transpose(0, 1))?;
    write_gif(path, fps, frames.size()[0], |t| {
        Ok(image_from(&frames.get(t)))
    })
}

/// Writes clips `(N, C, T, H, W)` in `[-1, 1]` as one looping GIF whose
/// frame `t` tiles every clip's frame `t`, `ncol` clips wide.
pub fn save_gif_grid(clips: &Tensor, ncol: i64, fps: u32, path: &Path) -> Result<()> {
    write_gif(path, fps, clips.size()[2], |t| {
        grid(&clips.select(2, t), ncol)
    })
}

/// Writes the `n` frames `frame(0..n)` as an endlessly looping GIF at `fps`.
fn write_gif(
    path: &Path,
    fps: u32,
    n: i64,
    mut frame: impl FnMut(i64) -> Result<RgbaImage>,
) -> Result<()> {
    let f = fs::File::create(path)
        .with_context(|| format!("cannot write {} (is the folder writable?)", path.display()))?;
    let mut enc = GifEncoder::new_with_speed(f, 10);
    enc.set_repeat(Repeat::Infinite)?;
    let delay = Delay::from_numer_denom_ms(1000, fps.max(1));
    for t in 0..n {
        enc.encode_frame(Frame::from_parts(frame(t)?, 0, 0, delay))
            .with_context(|| format!("encoding {}", path.display()))?;
    }
    Ok(())
}

/// Writes a video `(C, T, H, W)` in `[-1, 1]` as an H.264 MP4. Returns
/// `Ok(false)` when this `dim` was built without FFmpeg (the `video`
/// feature), so callers can skip MP4s and keep the GIFs.
pub fn save_mp4(video: &Tensor, fps: u32, path: &Path) -> Result<bool> {
    // (T, H, W, 4) RGBA → packed RGB.
    let rgba = to_rgba(&video.transpose(0, 1))?;
    let s = rgba.size();
    let rgb = rgba.narrow(3, 0, 3).contiguous();
    let mut bytes = vec![0u8; rgb.numel()];
    rgb.copy_data_u8(&mut bytes, rgb.numel());
    let (t, h, w) = (s[0] as usize, s[1] as usize, s[2] as usize);
    match dim_data::video::write_mp4(path, &bytes, t, h, w, fps.max(1)) {
        Ok(()) => Ok(true),
        Err(dim_data::DataError::NoVideoSupport { .. }) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

/// Writes the frames of a video `(C, T, H, W)` side by side as one PNG.
pub fn save_strip(video: &Tensor, path: &Path) -> Result<()> {
    let t = video.size()[1];
    save_grid(&video.transpose(0, 1), t, path)
}

/// Creates `dir` and checks it is writable, with a message that says what to do.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create output folder {}: choose a writable --out / train.out_dir",
            dir.display()
        )
    })?;
    let probe = dir.join(".dim-write-test");
    fs::write(&probe, b"").with_context(|| {
        format!(
            "output folder {} is not writable: choose another --out / train.out_dir",
            dir.display()
        )
    })?;
    let _ = fs::remove_file(probe);
    Ok(())
}
