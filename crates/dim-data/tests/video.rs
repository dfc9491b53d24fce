//! Video decoding against the `ffmpeg` program on real files, corrupt
//! files, and the video datasets.
#![cfg(feature = "video")]

mod common;

use std::path::Path;
use std::process::Command;

use dim_data::video::{decode_frames, probe, write_mp4};
use dim_data::{
    ClipSampling, ClipStart, DataError, Dataset, DecodeOptions, Loader, LoaderConfig, Split,
    Transform, Transformed, VideoDataset,
};

/// The first `n` frames of `path` as RGB24, decoded by the ffmpeg program
/// (one output frame per decoded frame: `-fps_mode passthrough`).
fn ffmpeg_rgb(path: &Path, n: usize) -> Vec<u8> {
    let out = common::ffmpeg_rgb24(path, &[], &["-frames:v", &n.to_string()], "-")
        .output()
        .expect("the ffmpeg program is missing: run cargo xtask setup");
    assert!(
        out.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Frame count as the ffmpeg program decodes it.
fn ffprobe_count(path: &Path) -> usize {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe is missing: run cargo xtask setup");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn check_against_ffmpeg(path: &Path, n: usize, w: usize, h: usize) {
    let info = probe(path).unwrap();
    assert_eq!((info.width, info.height), (w, h));
    let ours = decode_frames(path, &(0..n).collect::<Vec<_>>(), DecodeOptions::default()).unwrap();
    assert_eq!((ours.t, ours.h, ours.w, ours.c), (n, h, w, 3));
    let reference = ffmpeg_rgb(path, n);
    assert_eq!(reference.len(), n * h * w * 3);
    // Same swscale conversion (bicubic, BT.601 default) as the program: exact.
    for f in 0..n {
        let k = h * w * 3;
        assert!(
            ours.data[f * k..(f + 1) * k] == reference[f * k..(f + 1) * k],
            "{}: frame {f} differs",
            path.display()
        );
    }
}

#[test]
fn h264_mp4_matches_the_ffmpeg_program() {
    let path = common::video("bigbuckbunny.mp4");
    assert_eq!(probe(&path).unwrap().frames, ffprobe_count(&path));
    assert_eq!(probe(&path).unwrap().fps, 25.0);
    check_against_ffmpeg(&path, 6, 1280, 720);
    // A whole small clip, frame by frame.
    let small = common::video("carphone_pristine.mp4");
    let n = ffprobe_count(&small);
    assert_eq!(probe(&small).unwrap().frames, n);
    check_against_ffmpeg(&small, n, 176, 144);
}

#[test]
fn mpeg4_avi_matches_the_ffmpeg_program() {
    let path = common::opencv_sample("Megamind.avi");
    let info = probe(&path).unwrap();
    assert_eq!(info.frames, ffprobe_count(&path));
    check_against_ffmpeg(&path, 8, 720, 528);
}

#[test]
fn selected_frames_equal_the_sequential_decode() {
    let path = common::video("carphone_pristine.mp4");
    let all = decode_frames(
        &path,
        &(0..30).collect::<Vec<_>>(),
        DecodeOptions::default(),
    )
    .unwrap();
    let some = decode_frames(
        &path,
        &[3, 3, 10, 29],
        DecodeOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let k = 176 * 144 * 3;
    for (j, &i) in [3usize, 3, 10, 29].iter().enumerate() {
        assert!(
            some.data[j * k..(j + 1) * k] == all.data[i * k..(i + 1) * k],
            "frame {i}"
        );
    }
}

#[test]
fn mkv_and_webm_decode_like_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::video("carphone_pristine.mp4");
    let mkv = dir.path().join("clip.mkv");
    let webm = dir.path().join("clip.webm");
    let run = |args: &[&str], out: &Path| {
        let st = Command::new("ffmpeg")
            .args(["-v", "error", "-nostdin", "-y", "-i"])
            .arg(&src)
            .args(args)
            .arg(out)
            .status()
            .expect("ffmpeg program");
        assert!(st.success());
    };
    run(&["-frames:v", "20", "-c:v", "copy", "-an"], &mkv);
    run(
        &["-frames:v", "12", "-c:v", "libvpx", "-b:v", "200k", "-an"],
        &webm,
    );
    // Matroska declares no frame count: probe counts packets.
    assert_eq!(probe(&mkv).unwrap().frames, ffprobe_count(&mkv));
    check_against_ffmpeg(&mkv, 20, 176, 144);
    assert_eq!(probe(&webm).unwrap().frames, 12);
    check_against_ffmpeg(&webm, 12, 176, 144);
}

/// A written MP4 reads back with our decoder and the ffmpeg program: the frame
/// count, rate and (padded) size, and the pixels up to H.264's loss.
#[test]
fn written_mp4_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (t, h, w, fps) = (9usize, 30usize, 33usize, 12u32);
    // A moving grey gradient with a moving orange square (4:2:0 keeps
    // luma at full resolution, chroma at half, so colour stays blocky).
    let mut rgb = vec![0u8; t * h * w * 3];
    for f in 0..t {
        for y in 0..h {
            for x in 0..w {
                let i = ((f * h + y) * w + x) * 3;
                let square = (x + 2 * f) % w < 8 && (10..18).contains(&y);
                let grey = (x * 5 + y * 3 + f * 4) as u8;
                let px = if square { [230, 140, 40] } else { [grey; 3] };
                rgb[i..i + 3].copy_from_slice(&px);
            }
        }
    }
    let path = dir.path().join("clip.mp4");
    write_mp4(&path, &rgb, t, h, w, fps).unwrap();
    let info = probe(&path).unwrap();
    assert_eq!((info.frames, info.fps), (t, f64::from(fps)), "{info:?}");
    // 4:2:0 needs even sizes: one black column is added on the right.
    assert_eq!((info.height, info.width), (h, w + 1));
    assert_eq!(ffprobe_count(&path), t);
    let back = decode_frames(&path, &(0..t).collect::<Vec<_>>(), DecodeOptions::default()).unwrap();
    let mut se = 0f64;
    for f in 0..t {
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let a = f64::from(rgb[((f * h + y) * w + x) * 3 + c]);
                    let b = f64::from(back.data[((f * h + y) * (w + 1) + x) * 3 + c]);
                    se += (a - b) * (a - b);
                }
            }
        }
    }
    let psnr = 10.0 * (255.0f64 * 255.0 / (se / (t * h * w * 3) as f64)).log10();
    assert!(psnr > 30.0, "PSNR {psnr:.1} dB");
    // Bad arguments name the file.
    let e = write_mp4(&dir.path().join("bad.mp4"), &rgb[..10], t, h, w, fps).unwrap_err();
    assert!(e.to_string().contains("bad.mp4"), "{e}");
}

#[test]
fn truncated_and_garbage_videos_are_corrupt_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let is_corrupt = |e: &DataError, name: &str| matches!(e, DataError::Corrupt { path, .. } if path.ends_with(name));
    // An mp4 cut before its index (moov at the end).
    let mp4 = std::fs::read(common::video("bigbuckbunny.mp4")).unwrap();
    let cut = dir.path().join("cut.mp4");
    std::fs::write(&cut, &mp4[..mp4.len() / 2]).unwrap();
    let e = decode_frames(&cut, &[0], DecodeOptions::default()).unwrap_err();
    assert!(is_corrupt(&e, "cut.mp4"), "{e}");
    assert!(e.to_string().contains("cut.mp4"));
    // An avi cut mid-stream: the frames before the cut decode, asking for
    // frames after it is an error, not a short or concealed clip.
    let avi = std::fs::read(common::opencv_sample("Megamind.avi")).unwrap();
    let cut_avi = dir.path().join("cut.avi");
    std::fs::write(&cut_avi, &avi[..300_000]).unwrap();
    assert!(decode_frames(&cut_avi, &[0, 1, 2], DecodeOptions::default()).is_ok());
    let e = decode_frames(&cut_avi, &[200], DecodeOptions::default()).unwrap_err();
    assert!(is_corrupt(&e, "cut.avi"), "{e}");
    // Garbage with a video extension.
    let junk = dir.path().join("junk.mp4");
    std::fs::write(
        &junk,
        (0..50_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let e = decode_frames(&junk, &[0], DecodeOptions::default()).unwrap_err();
    assert!(is_corrupt(&e, "junk.mp4"), "{e}");
    // Missing file: an I/O error with the path.
    let e = probe(&dir.path().join("nope.avi")).unwrap_err();
    assert!(
        matches!(e, DataError::Io { .. }) && e.to_string().contains("nope.avi"),
        "{e}"
    );
}

fn link(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(src, dst).unwrap();
}

#[test]
fn ucf101_layout_with_frame_folders_and_split_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("UCF-101");
    let lists = dir.path().join("ucfTrainTestlist");
    std::fs::create_dir_all(&lists).unwrap();
    link(
        &common::opencv_sample("Megamind.avi"),
        &root.join("Apply/v_Apply_g01_c01.avi"),
    );
    link(
        &common::video("carphone_pristine.mp4"),
        &root.join("Bike/v_Bike_g01_c01.avi"),
    );
    // A clip stored as frame images instead of a video.
    let frames = root.join("Bike/v_Bike_g08_c01");
    std::fs::create_dir_all(&frames).unwrap();
    for i in 1..=12u8 {
        image::RgbImage::from_pixel(40, 30, image::Rgb([i * 20, 0, 0]))
            .save(frames.join(format!("frame{i}.png")))
            .unwrap();
    }
    std::fs::write(lists.join("classInd.txt"), "1 Bike\n2 Apply\n").unwrap();
    std::fs::write(
        lists.join("trainlist01.txt"),
        "Apply/v_Apply_g01_c01.avi 2\nBike/v_Bike_g08_c01.avi 1\n",
    )
    .unwrap();
    std::fs::write(lists.join("testlist01.txt"), "Bike/v_Bike_g01_c01.avi\n").unwrap();
    let clip = ClipSampling {
        frames: 4,
        stride: 3,
        start: ClipStart::Center,
        ..Default::default()
    };
    let train = VideoDataset::ucf101(&root, &lists, 1, Split::Train, clip.clone()).unwrap();
    assert_eq!(train.len(), 2);
    // Label order is classInd order, not name order.
    assert_eq!(train.classes(), ["Bike", "Apply"]);
    let ds = Transformed::new(train, vec![Transform::CenterCropResize { size: 24 }]);
    let a = ds.get(0, 0).unwrap();
    assert_eq!(a.data.size(), [3, 4, 24, 24]);
    assert_eq!(a.label, Some(1));
    let b = ds.get(1, 0).unwrap();
    assert_eq!(b.label, Some(0));
    // 12 frames, span 10, centre start 1: frames 2, 5, 8, 11 (1-based names),
    // red = 20 * name, scaled to [-1, 1].
    for (t, name) in [2.0, 5.0, 8.0, 11.0].iter().enumerate() {
        let r = b.data.double_value(&[0, t as i64, 5, 5]);
        assert!(
            (r - (20.0 * name / 127.5 - 1.0)).abs() < 1e-5,
            "frame {t}: {r}"
        );
    }
    let test = VideoDataset::ucf101(&root, &lists, 1, Split::Test, clip.clone()).unwrap();
    assert_eq!(test.len(), 1);
    assert_eq!(test.get(0, 0).unwrap().label, Some(0));
    // Missing split file and unknown class: clear messages with the file.
    let e = VideoDataset::ucf101(&root, &lists, 2, Split::Train, clip.clone())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trainlist02.txt") && e.contains("split file"),
        "{e}"
    );
    std::fs::write(lists.join("testlist03.txt"), "Cook/v_Cook_g01_c01.avi\n").unwrap();
    std::fs::write(lists.join("trainlist03.txt"), "").unwrap();
    let e = VideoDataset::ucf101(&root, &lists, 3, Split::Test, clip)
        .unwrap_err()
        .to_string();
    assert!(e.contains("testlist03.txt") && e.contains("Cook"), "{e}");
}

#[test]
fn video_folder_batches_short_video_errors_and_empty_folders() {
    let dir = tempfile::tempdir().unwrap();
    link(
        &common::video("carphone_pristine.mp4"),
        &dir.path().join("a/one.mp4"),
    );
    link(
        &common::opencv_sample("Megamind.avi"),
        &dir.path().join("b/two.avi"),
    );
    let clip = ClipSampling {
        frames: 3,
        stride: 2,
        ..Default::default()
    };
    let ds = VideoDataset::folder(dir.path(), true, clip).unwrap();
    let ds = std::sync::Arc::new(Transformed::new(
        ds,
        vec![
            Transform::CenterCropResize { size: 16 },
            Transform::RandomFlip { p: 0.5 },
        ],
    ));
    let mut loader = Loader::new(
        ds.clone(),
        LoaderConfig {
            batch_size: 2,
            workers: 2,
            pin_memory: false,
            ..Default::default()
        },
    )
    .unwrap();
    let b = loader.next_batch().unwrap().unwrap();
    assert_eq!(b.x.size(), [2, 3, 3, 16, 16]);
    let mut y: Vec<i64> = Vec::try_from(b.y.as_ref().unwrap()).unwrap();
    y.sort();
    assert_eq!(y, [0, 1]);
    // Same (seed, epoch, index): same clip start and flip.
    let again = ds
        .get(b.indices[0], dim_data::sample_seed(0, 0, b.indices[0]))
        .unwrap();
    assert!(again.data.equal(&b.x.get(0)));

    let long = ClipSampling {
        frames: 200,
        ..Default::default()
    };
    let short = VideoDataset::folder(dir.path().join("a"), false, long).unwrap();
    let e = short.get(0, 0).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::VideoTooShort {
                frames: 120,
                needed: 200,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("one.mp4") && e.to_string().contains("too short"));

    let empty = tempfile::tempdir().unwrap();
    let e = VideoDataset::folder(empty.path(), true, ClipSampling::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no video files"), "{e}");
}
