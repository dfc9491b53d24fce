//! Decoded pixels before they become tensors, and the transforms on them.
//!
//! Transforms run on `u8` pixels (cheap, cache-friendly) and only the final
//! conversion produces `f32` in `[-1, 1]`. A clip's frames share one
//! [`Frames`] value, so every transform (one crop, one flip) applies to all of
//! them alike.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{DataError, Result};
use crate::rng::Rng;

/// `t` frames of `h`×`w` pixels with `c` interleaved `u8` channels, stored
/// `(T, H, W, C)`. An image is `t == 1` with `clip == false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frames {
    /// Number of frames.
    pub t: usize,
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// Channels (1 grey, 3 RGB).
    pub c: usize,
    /// Whether this is a video clip: decides `(C, T, H, W)` versus `(C, H, W)`.
    pub clip: bool,
    /// `t * h * w * c` bytes, `(T, H, W, C)` order.
    pub data: Vec<u8>,
}

impl Frames {
    /// One image from `(H, W, C)` bytes.
    pub fn image(h: usize, w: usize, c: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), h * w * c);
        Self {
            t: 1,
            h,
            w,
            c,
            clip: false,
            data,
        }
    }

    /// A clip from `(T, H, W, C)` bytes.
    pub fn clip(t: usize, h: usize, w: usize, c: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), t * h * w * c);
        Self {
            t,
            h,
            w,
            c,
            clip: true,
            data,
        }
    }

    fn frame_len(&self) -> usize {
        self.h * self.w * self.c
    }

    /// Scales to `f32` in `[-1, 1]` (`x / 127.5 - 1`) and returns `(C, H, W)`
    /// for an image or `(C, T, H, W)` for a clip.
    pub fn to_tensor(&self) -> Tensor {
        let (t, h, w, c) = (self.t, self.h, self.w, self.c);
        let plane = t * h * w;
        let mut out = vec![0f32; c * plane];
        // (T,H,W,C) -> (C,T,H,W): one pass, channel-strided reads.
        for ch in 0..c {
            let dst = &mut out[ch * plane..(ch + 1) * plane];
            for (p, d) in dst.iter_mut().enumerate() {
                *d = self.data[p * c + ch] as f32 / 127.5 - 1.0;
            }
        }
        let tensor = Tensor::from_slice(&out);
        if self.clip {
            tensor.view([c as i64, t as i64, h as i64, w as i64])
        } else {
            tensor.view([c as i64, h as i64, w as i64])
        }
    }

    /// Mirrors every frame left-right.
    pub fn flip_horizontal(&mut self) {
        let (w, c) = (self.w, self.c);
        for row in self.data.chunks_exact_mut(w * c) {
            for x in 0..w / 2 {
                for ch in 0..c {
                    row.swap(x * c + ch, (w - 1 - x) * c + ch);
                }
            }
        }
    }

    /// Pads every frame with `value` to `size`×`size`, centred (28 → 32 adds
    /// two pixels on each side). Fails if a side is already larger.
    pub fn pad_to(&mut self, size: usize, value: u8) -> std::result::Result<(), String> {
        if self.h > size || self.w > size {
            return Err(format!(
                "cannot pad a {}x{} image to {size}x{size}: it is larger",
                self.h, self.w
            ));
        }
        let (top, left) = ((size - self.h) / 2, (size - self.w) / 2);
        let c = self.c;
        let mut out = vec![value; self.t * size * size * c];
        for f in 0..self.t {
            for y in 0..self.h {
                let src = (f * self.h + y) * self.w * c;
                let dst = ((f * size + y + top) * size + left) * c;
                out[dst..dst + self.w * c].copy_from_slice(&self.data[src..src + self.w * c]);
            }
        }
        self.h = size;
        self.w = size;
        self.data = out;
        Ok(())
    }

    /// Crops every frame to the window at (`top`, `left`) of `h`×`w`;
    /// fails if the window leaves the frame.
    pub fn crop(
        &mut self,
        top: usize,
        left: usize,
        h: usize,
        w: usize,
    ) -> std::result::Result<(), String> {
        if top + h > self.h || left + w > self.w {
            return Err(format!(
                "crop {h}x{w} at ({top}, {left}) leaves the {}x{} frame",
                self.h, self.w
            ));
        }
        let c = self.c;
        let mut out = Vec::with_capacity(self.t * h * w * c);
        for f in 0..self.t {
            for y in top..top + h {
                let src = ((f * self.h + y) * self.w + left) * c;
                out.extend_from_slice(&self.data[src..src + w * c]);
            }
        }
        self.h = h;
        self.w = w;
        self.data = out;
        Ok(())
    }

    /// Resamples every frame to `h`×`w` with `filter`, antialiased when
    /// shrinking (the filter widens by the scale factor).
    pub fn resize(&mut self, h: usize, w: usize, filter: Filter) {
        if h == self.h && w == self.w {
            return;
        }
        let c = self.c;
        let horizontal = Weights::new(self.w, w, filter);
        let vertical = Weights::new(self.h, h, filter);
        let mut out = Vec::with_capacity(self.t * h * w * c);
        let mut tmp = vec![0f32; self.h * w * c];
        let mut acc_row = vec![0f32; w * c];
        let mut acc = vec![0f32; c];
        for f in 0..self.t {
            let frame = &self.data[f * self.frame_len()..(f + 1) * self.frame_len()];
            // Horizontal pass into f32, then vertical pass with rounding, so
            // rounding happens once. Both loops are written over slices so
            // the compiler can drop bounds checks and vectorise.
            for y in 0..self.h {
                let row = &frame[y * self.w * c..(y + 1) * self.w * c];
                let dst = &mut tmp[y * w * c..(y + 1) * w * c];
                for (x, px) in dst.chunks_exact_mut(c).enumerate() {
                    let (start, ws) = horizontal.taps(x);
                    let src = &row[start * c..(start + ws.len()) * c];
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    for (wt, s) in ws.iter().zip(src.chunks_exact(c)) {
                        for (a, &v) in acc.iter_mut().zip(s) {
                            *a += wt * v as f32;
                        }
                    }
                    px.copy_from_slice(&acc);
                }
            }
            for y in 0..h {
                let (start, ws) = vertical.taps(y);
                acc_row.iter_mut().for_each(|a| *a = 0.0);
                for (k, wt) in ws.iter().enumerate() {
                    let src = &tmp[(start + k) * w * c..(start + k + 1) * w * c];
                    for (a, s) in acc_row.iter_mut().zip(src) {
                        *a += wt * s;
                    }
                }
                out.extend(acc_row.iter().map(|a| a.round().clamp(0.0, 255.0) as u8));
            }
        }
        self.h = h;
        self.w = w;
        self.data = out;
    }

    /// DiT/ADM `center_crop_arr`: halve with a box filter while the short
    /// side is at least `2 * size`, resize bicubically so the short side is
    /// `size` (long side rounded half-to-even, as Python's `round`), then
    /// crop the centre `size`×`size`.
    pub fn center_crop_resize(&mut self, size: usize) {
        while self.h.min(self.w) >= 2 * size {
            let (h, w) = (self.h / 2, self.w / 2);
            self.resize(h, w, Filter::Box);
        }
        let scale = size as f64 / self.h.min(self.w) as f64;
        let h = ((self.h as f64 * scale).round_ties_even() as usize).max(size);
        let w = ((self.w as f64 * scale).round_ties_even() as usize).max(size);
        self.resize(h, w, Filter::Bicubic);
        let (top, left) = ((self.h - size) / 2, (self.w - size) / 2);
        self.crop(top, left, size, size)
            .expect("both sides are at least `size` after the resize");
    }
}

/// Resampling kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Area average (each output pixel is the mean of the input it covers).
    Box,
    /// Cubic convolution with `a = -0.5` (Keys / Catmull-Rom), support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Box => {
                if x < 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Precomputed normalised filter taps for one axis.
struct Weights {
    starts: Vec<usize>,
    taps: Vec<Vec<f32>>,
}

impl Weights {
    fn new(input: usize, output: usize, filter: Filter) -> Self {
        let scale = input as f64 / output as f64;
        let widen = scale.max(1.0);
        let support = filter.support() * widen;
        let mut starts = Vec::with_capacity(output);
        let mut taps = Vec::with_capacity(output);
        for o in 0..output {
            let centre = (o as f64 + 0.5) * scale;
            let lo = ((centre - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((centre + support + 0.5).floor() as usize)
                .min(input)
                .max(lo + 1);
            let mut ws: Vec<f64> = (lo..hi)
                .map(|i| filter.eval((i as f64 - centre + 0.5) / widen))
                .collect();
            let sum: f64 = ws.iter().sum();
            if sum.abs() > 0.0 {
                ws.iter_mut().for_each(|w| *w /= sum);
            } else {
                // Degenerate (tiny input): nearest neighbour.
                ws.iter_mut().for_each(|w| *w = 0.0);
                let nearest = (centre as usize).clamp(lo, hi - 1);
                ws[nearest - lo] = 1.0;
            }
            starts.push(lo);
            taps.push(ws.into_iter().map(|w| w as f32).collect());
        }
        Self { starts, taps }
    }

    fn taps(&self, o: usize) -> (usize, &[f32]) {
        (self.starts[o], &self.taps[o])
    }
}

/// One step of a pixel pipeline. Random steps draw from the per-sample
/// generator, which the loader seeds from (seed, epoch, index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// ADM/DiT centre crop and resize to `size`×`size` ([`Frames::center_crop_resize`]).
    CenterCropResize {
        /// Output side in pixels.
        size: usize,
    },
    /// Mirror left-right with probability `p`.
    RandomFlip {
        /// Probability of flipping, in `[0, 1]`.
        p: f64,
    },
    /// Pad centred to `size`×`size` with `value` (e.g. 28 → 32 for MNIST).
    Pad {
        /// Output side in pixels.
        size: usize,
        /// Fill value (0 = black).
        #[serde(default)]
        value: u8,
    },
}

impl Transform {
    /// Applies the step to all frames; `origin` names the sample in errors.
    pub fn apply(&self, frames: &mut Frames, rng: &mut Rng, origin: &str) -> Result<()> {
        match *self {
            Transform::CenterCropResize { size } => frames.center_crop_resize(size),
            Transform::RandomFlip { p } => {
                // Always draw, so later steps see the same stream whatever p is.
                if rng.uniform() < p {
                    frames.flip_horizontal();
                }
            }
            Transform::Pad { size, value } => frames
                .pad_to(size, value)
                .map_err(|e| DataError::corrupt(origin, e))?,
        }
        Ok(())
    }

    /// Checks parameters; `key` names the config entry in the error.
    pub fn validate(&self, key: &str) -> Result<()> {
        match *self {
            Transform::CenterCropResize { size } | Transform::Pad { size, .. } if size == 0 => {
                Err(DataError::config(format!("{key}.size"), "must be positive"))
            }
            Transform::RandomFlip { p } if !(0.0..=1.0).contains(&p) => Err(DataError::config(
                format!("{key}.p"),
                format!("must be in [0, 1], got {p}"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(h: usize, w: usize, c: usize) -> Frames {
        Frames::image(h, w, c, (0..h * w * c).map(|i| (i % 251) as u8).collect())
    }

    #[test]
    fn to_tensor_scales_and_orders_channels_first() {
        let f = Frames::image(1, 2, 3, vec![0, 255, 51, 102, 153, 204]);
        let t = f.to_tensor();
        assert_eq!(t.size(), [3, 1, 2]);
        let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap();
        let expect: Vec<f32> = [0u8, 102, 255, 153, 51, 204]
            .iter()
            .map(|&x| x as f32 / 127.5 - 1.0)
            .collect();
        assert_eq!(v, expect);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[2], 1.0);
        let clip = Frames::clip(2, 1, 1, 1, vec![0, 255]).to_tensor();
        assert_eq!(clip.size(), [1, 2, 1, 1]);
    }

    #[test]
    fn flip_twice_is_identity_and_flip_mirrors() {
        let mut f = ramp(3, 5, 3);
        let orig = f.clone();
        f.flip_horizontal();
        assert_eq!(&f.data[0..3], &orig.data[12..15]);
        f.flip_horizontal();
        assert_eq!(f, orig);
    }

    #[test]
    fn pad_centres_the_image() {
        let mut f = Frames::image(28, 28, 1, vec![9; 28 * 28]);
        f.pad_to(32, 0).unwrap();
        assert_eq!((f.h, f.w), (32, 32));
        assert_eq!(f.data.iter().filter(|&&v| v == 9).count(), 28 * 28);
        assert_eq!(f.data[0], 0);
        assert_eq!(f.data[2 * 32 + 2], 9);
        assert_eq!(f.data[2 * 32 + 1], 0);
        assert_eq!(f.data[29 * 32 + 29], 9);
        assert_eq!(f.data[30 * 32 + 30], 0);
        assert!(Frames::image(40, 40, 1, vec![0; 1600])
            .pad_to(32, 0)
            .is_err());
        let mut r = ramp(4, 5, 1);
        assert!(r.crop(2, 2, 3, 3).is_err());
        r.crop(1, 2, 2, 3).unwrap();
        assert_eq!(r.data, vec![7, 8, 9, 12, 13, 14]);
    }

    #[test]
    fn box_halving_averages_blocks() {
        let mut f = Frames::image(2, 4, 1, vec![0, 10, 20, 40, 2, 12, 22, 42]);
        f.resize(1, 2, Filter::Box);
        // Means of the 2x2 blocks: (0+10+2+12)/4 = 6, (20+40+22+42)/4 = 31.
        assert_eq!(f.data, vec![6, 31]);
    }

    #[test]
    fn resize_keeps_constant_images_constant() {
        for filter in [Filter::Box, Filter::Bicubic] {
            let mut f = Frames::image(17, 23, 3, vec![77; 17 * 23 * 3]);
            f.resize(9, 31, filter);
            assert_eq!((f.h, f.w), (9, 31));
            assert!(f.data.iter().all(|&v| v == 77));
        }
    }

    #[test]
    fn center_crop_resize_follows_adm_sizes() {
        // 300x500 with size 64: halve twice (300 >= 128 -> 150x250, 150 >= 128
        // -> 75x125), scale 64/75 -> 64 x round(106.67) = 107, crop centre.
        let mut f = ramp(300, 500, 3);
        f.center_crop_resize(64);
        assert_eq!((f.h, f.w, f.c), (64, 64, 3));
        // A left-right symmetric image stays symmetric (centred crop).
        let mut sym = Frames::image(50, 80, 1, vec![0; 4000]);
        for y in 0..50 {
            for x in 0..80 {
                sym.data[y * 80 + x] = (x.min(79 - x) * 3) as u8;
            }
        }
        sym.center_crop_resize(20);
        for y in 0..20 {
            for x in 0..10 {
                let (a, b) = (sym.data[y * 20 + x], sym.data[y * 20 + 19 - x]);
                assert!(a.abs_diff(b) <= 1, "row {y}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bicubic_upscale_interpolates_a_linear_ramp() {
        // A linear ramp stays linear under cubic convolution (a = -0.5 is exact
        // for quadratics) away from the borders.
        let mut f = Frames::image(1, 8, 1, (0..8).map(|x| x * 20).collect());
        f.resize(1, 16, Filter::Bicubic);
        for x in 4..12 {
            let centre = (x as f64 + 0.5) / 2.0 - 0.5;
            let want = centre * 20.0;
            assert!(
                (f.data[x] as f64 - want).abs() <= 0.51,
                "{x}: {} vs {want}",
                f.data[x]
            );
        }
    }

    #[test]
    fn transforms_validate() {
        assert!(Transform::RandomFlip { p: 1.5 }.validate("t").is_err());
        assert!(Transform::Pad { size: 0, value: 0 }.validate("t").is_err());
        assert!(Transform::CenterCropResize { size: 8 }
            .validate("t")
            .is_ok());
    }
}
