//! Video decoding (and MP4 writing, for samples) through the FFmpeg
//! libraries, in process via `ffmpeg-next` (the `video` feature; without it,
//! [`probe`], [`decode_each`] and [`write_mp4`] return
//! [`DataError::NoVideoSupport`]).

use std::path::Path;
use std::sync::Once;

use ffmpeg_next as ffmpeg;

use crate::decode::{DecodeOptions, VideoInfo};
use crate::error::{DataError, Result};

fn init_ffmpeg() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Decoding problems come back as our errors; FFmpeg's own log lines
        // would only duplicate them on stderr.
        let _ = ffmpeg::init();
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
    });
}

fn ff_err(path: &Path, what: &str, e: ffmpeg::Error) -> DataError {
    DataError::corrupt(path, format!("{what}: {e}"))
}

fn open_input(path: &Path) -> Result<(ffmpeg::format::context::Input, usize)> {
    init_ffmpeg();
    if let Err(e) = std::fs::metadata(path) {
        return Err(DataError::io(path, e));
    }
    let ictx = ffmpeg::format::input(path).map_err(|e| ff_err(path, "cannot open", e))?;
    let stream = ictx
        .streams()
        .best(ffmpeg::media::Type::Video)
        .ok_or_else(|| DataError::corrupt(path, "no video stream"))?;
    let index = stream.index();
    Ok((ictx, index))
}

/// Reads the stream facts of `path` without decoding pictures.
pub fn probe(path: &Path) -> Result<VideoInfo> {
    let (mut ictx, index) = open_input(path)?;
    let stream = ictx.stream(index).expect("index from best()");
    let rate = stream.avg_frame_rate();
    let rate = if rate.denominator() != 0 && rate.numerator() > 0 {
        rate
    } else {
        stream.rate()
    };
    let fps = if rate.denominator() != 0 {
        rate.numerator() as f64 / rate.denominator() as f64
    } else {
        0.0
    };
    let params = stream.parameters();
    let (width, height) = unsafe {
        // SAFETY: `params` wraps a valid AVCodecParameters owned by the stream.
        let p = &*params.as_ptr();
        (p.width.max(0) as usize, p.height.max(0) as usize)
    };
    let mut frames = stream.frames().max(0) as usize;
    if frames == 0 {
        // Matroska/WebM declare no count: count the video packets instead
        // (one per frame for the codecs used here; no decoding needed).
        let mut packet = ffmpeg::Packet::empty();
        loop {
            match packet.read(&mut ictx) {
                Ok(()) => frames += usize::from(packet.stream() == index),
                Err(ffmpeg::Error::Eof) => break,
                Err(ffmpeg::Error::InvalidData) => continue,
                Err(e) => return Err(ff_err(path, "reading packets", e)),
            }
        }
    }
    Ok(VideoInfo {
        frames,
        fps,
        width,
        height,
    })
}

/// Like [`decode_frames`], but hands each wanted frame to `sink` as packed
/// RGB24 bytes `(H, W, 3)` with its width and height, reusing one buffer,
/// instead of collecting the clip (for streaming and benchmarks).
pub fn decode_each(
    path: &Path,
    wanted: &[usize],
    options: DecodeOptions,
    mut sink: impl FnMut(&[u8], usize, usize),
) -> Result<()> {
    debug_assert!(wanted.windows(2).all(|w| w[0] <= w[1]));
    let (mut ictx, index) = open_input(path)?;
    let declared = ictx.stream(index).map_or(0, |s| s.frames().max(0) as usize);
    let params = ictx.stream(index).expect("index from best()").parameters();
    let mut ctx = ffmpeg::codec::context::Context::from_parameters(params)
        .map_err(|e| ff_err(path, "no decoder", e))?;
    ctx.set_threading(ffmpeg::codec::threading::Config {
        kind: ffmpeg::codec::threading::Type::Frame,
        count: options.threads.max(1),
        ..Default::default()
    });
    if options.strict {
        // SAFETY: `ctx` owns a valid, not yet opened AVCodecContext.
        unsafe {
            (*ctx.as_mut_ptr()).err_recognition |= ffmpeg::ffi::AV_EF_EXPLODE;
        }
    }
    let mut decoder = ctx
        .decoder()
        .video()
        .map_err(|e| ff_err(path, "cannot open the decoder", e))?;

    let mut packed: Vec<u8> = Vec::new();
    let (mut w, mut h) = (0usize, 0usize);
    let mut scaler: Option<ffmpeg::software::scaling::Context> = None;
    let mut next = 0usize; // position in `wanted`
    let mut decoded = 0usize; // frames decoded so far
    let mut frame = ffmpeg::frame::Video::empty();
    let mut rgb = ffmpeg::frame::Video::empty();

    // Pulls every frame the decoder has ready; returns true when done.
    let mut drain = |decoder: &mut ffmpeg::decoder::Video| -> Result<bool> {
        while next < wanted.len() {
            match decoder.receive_frame(&mut frame) {
                Ok(()) => {}
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::util::error::EAGAIN => {
                    return Ok(false)
                }
                Err(ffmpeg::Error::Eof) => return Ok(false),
                Err(e) => return Err(ff_err(path, "decoding", e)),
            }
            let k = decoded;
            decoded += 1;
            if wanted[next] != k {
                continue;
            }
            let (fw, fh) = (frame.width() as usize, frame.height() as usize);
            if scaler.is_none() {
                scaler = Some(
                    ffmpeg::software::scaling::Context::get(
                        frame.format(),
                        frame.width(),
                        frame.height(),
                        ffmpeg::format::Pixel::RGB24,
                        frame.width(),
                        frame.height(),
                        ffmpeg::software::scaling::Flags::BICUBIC,
                    )
                    .map_err(|e| ff_err(path, "no pixel converter", e))?,
                );
                (w, h) = (fw, fh);
                packed.reserve(w * h * 3);
            }
            if (fw, fh) != (w, h) {
                return Err(DataError::corrupt(
                    path,
                    format!("frame size changes mid-stream ({w}x{h} to {fw}x{fh})"),
                ));
            }
            scaler
                .as_mut()
                .expect("created above")
                .run(&frame, &mut rgb)
                .map_err(|e| ff_err(path, "pixel conversion", e))?;
            let stride = rgb.stride(0);
            let data = rgb.data(0);
            packed.clear();
            for y in 0..h {
                packed.extend_from_slice(&data[y * stride..y * stride + w * 3]);
            }
            // A frame wanted twice (target fps above the source's) is
            // converted once.
            while next < wanted.len() && wanted[next] == k {
                sink(&packed, w, h);
                next += 1;
            }
        }
        Ok(true)
    };

    let mut packet = ffmpeg::Packet::empty();
    let mut done = wanted.is_empty();
    while !done {
        match packet.read(&mut ictx) {
            Ok(()) => {
                if packet.stream() != index {
                    continue;
                }
                match decoder.send_packet(&packet) {
                    Ok(()) => {}
                    Err(ffmpeg::Error::InvalidData) => {
                        return Err(DataError::corrupt(
                            path,
                            format!("invalid data in the packet of frame {decoded}"),
                        ))
                    }
                    Err(e) => return Err(ff_err(path, "decoding", e)),
                }
                done = drain(&mut decoder)?;
            }
            Err(ffmpeg::Error::Eof) => {
                let _ = decoder.send_eof();
                drain(&mut decoder)?;
                break;
            }
            Err(e) => return Err(ff_err(path, "reading packets (truncated file?)", e)),
        }
    }
    if next < wanted.len() {
        let last = *wanted.last().expect("non-empty");
        return Err(if declared > decoded {
            DataError::corrupt(
                path,
                format!("decoding ended after {decoded} of the {declared} frames the container declares (truncated file?)"),
            )
        } else {
            DataError::VideoTooShort {
                path: path.to_path_buf(),
                frames: decoded,
                needed: last + 1,
            }
        });
    }
    Ok(())
}

/// Writes a clip of packed RGB24 frames `(T, H, W, 3)` to `path` as H.264
/// (yuv420p, CRF 18) in an MP4 container at `fps` frames per second; the
/// MPEG-4 Part 2 encoder stands in when the FFmpeg build has no libx264.
/// Odd sizes are padded by one black row or column (4:2:0 needs even ones).
pub fn write_mp4(
    path: &Path,
    rgb: &[u8],
    frames: usize,
    height: usize,
    width: usize,
    fps: u32,
) -> Result<()> {
    init_ffmpeg();
    if frames == 0
        || height == 0
        || width == 0
        || fps == 0
        || rgb.len() != frames * height * width * 3
    {
        return Err(DataError::corrupt(
            path,
            format!(
                "cannot encode {frames} frames of {height}×{width} RGB at {fps} fps from {} bytes",
                rgb.len()
            ),
        ));
    }
    let err = |what: &'static str| move |e: ffmpeg::Error| ff_err(path, what, e);
    let (ew, eh) = (
        width.next_multiple_of(2) as u32,
        height.next_multiple_of(2) as u32,
    );
    let mut octx = ffmpeg::format::output(&path).map_err(err("cannot create"))?;
    let global_header = octx
        .format()
        .flags()
        .contains(ffmpeg::format::Flags::GLOBAL_HEADER);
    let (codec, x264) = match ffmpeg::encoder::find_by_name("libx264") {
        Some(c) => (c, true),
        None => (
            ffmpeg::encoder::find(ffmpeg::codec::Id::MPEG4).ok_or_else(|| {
                DataError::corrupt(
                    path,
                    "this FFmpeg has neither libx264 nor an MPEG-4 encoder",
                )
            })?,
            false,
        ),
    };
    let mut ost = octx
        .add_stream(codec)
        .map_err(err("cannot add a video stream"))?;
    let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .map_err(err("no video encoder"))?;
    let time_base = ffmpeg::Rational::new(1, fps as i32);
    enc.set_width(ew);
    enc.set_height(eh);
    enc.set_format(ffmpeg::format::Pixel::YUV420P);
    enc.set_time_base(time_base);
    enc.set_frame_rate(Some(ffmpeg::Rational::new(fps as i32, 1)));
    if global_header {
        enc.set_flags(ffmpeg::codec::Flags::GLOBAL_HEADER);
    }
    let mut opts = ffmpeg::Dictionary::new();
    if x264 {
        opts.set("crf", "18");
        opts.set("preset", "medium");
    } else {
        enc.set_bit_rate(8 * (ew * eh) as usize * fps as usize / 10);
    }
    let mut encoder = enc
        .open_with(opts)
        .map_err(err("cannot open the encoder"))?;
    ost.set_parameters(&encoder);
    // The container's frame rate, and packet durations below, so that
    // readers see `fps` rather than frames over the first-to-last pts span.
    ost.set_time_base(time_base);
    ost.set_avg_frame_rate(ffmpeg::Rational::new(fps as i32, 1));
    ost.set_rate(ffmpeg::Rational::new(fps as i32, 1));
    octx.write_header()
        .map_err(err("cannot write the header"))?;
    let ost_tb = octx.stream(0).expect("stream 0 was added").time_base();
    let mut scaler = ffmpeg::software::scaling::Context::get(
        ffmpeg::format::Pixel::RGB24,
        ew,
        eh,
        ffmpeg::format::Pixel::YUV420P,
        ew,
        eh,
        ffmpeg::software::scaling::Flags::BICUBIC,
    )
    .map_err(err("cannot set up the colour conversion"))?;
    let drain = |encoder: &mut ffmpeg::encoder::Video,
                 octx: &mut ffmpeg::format::context::Output|
     -> Result<()> {
        let mut packet = ffmpeg::Packet::empty();
        while encoder.receive_packet(&mut packet).is_ok() {
            packet.set_stream(0);
            packet.set_duration(1);
            packet.rescale_ts(time_base, ost_tb);
            packet
                .write_interleaved(octx)
                .map_err(err("cannot write a packet"))?;
        }
        Ok(())
    };
    let mut src = ffmpeg::frame::Video::new(ffmpeg::format::Pixel::RGB24, ew, eh);
    let frame_bytes = height * width * 3;
    for (i, clip_frame) in rgb.chunks_exact(frame_bytes).enumerate() {
        let stride = src.stride(0);
        let data = src.data_mut(0);
        data.fill(0); // the padding row / column stays black
        for (r, row) in clip_frame.chunks_exact(width * 3).enumerate() {
            data[r * stride..r * stride + width * 3].copy_from_slice(row);
        }
        let mut yuv = ffmpeg::frame::Video::empty();
        scaler
            .run(&src, &mut yuv)
            .map_err(err("colour conversion failed"))?;
        yuv.set_pts(Some(i as i64));
        encoder.send_frame(&yuv).map_err(err("encoding failed"))?;
        drain(&mut encoder, &mut octx)?;
    }
    encoder.send_eof().map_err(err("encoding failed"))?;
    drain(&mut encoder, &mut octx)?;
    octx.write_trailer()
        .map_err(err("cannot finish the file"))?;
    Ok(())
}
