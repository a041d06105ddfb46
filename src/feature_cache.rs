//! The target's states of a list of training sequences, kept on disk so
//! that a resumed `train-draft`, `--evaluate` or a second head on the same
//! set skips the packed prefill that makes them (the slowest part of a
//! run: about as long as an epoch).
//!
//! Invariant: a cache file is used only when its key matches: the SHA-256
//! of the model file, the tap, every sequence's tokens (cut to `max_len`)
//! and this build's version and `FORMAT` (bumped when the forward or the
//! taps change what they give); the floats are the exact f32 values the
//! prefill gave, so a run from the cache trains the same bytes as one
//! without. Files are written whole or not at all (a temporary name of
//! their own, then rename).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use heterospec_engine::FeatureTap;
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"HSFEAT01";
/// Part of every key: bump it when the target's forward or its feature
/// taps change what they give, so older files are never read.
const FORMAT: u32 = 1;

/// A directory of kept features for one model file, whose bytes start
/// every key (read once: the hasher's state after them).
pub struct FeatureCache {
    dir: PathBuf,
    model: Sha256,
}

impl FeatureCache {
    pub fn open(dir: &Path, model: &Path) -> Result<Self> {
        let mut h = Sha256::new();
        let mut f = File::open(model).with_context(|| format!("cannot read {}", model.display()))?;
        std::io::copy(&mut f, &mut h)?;
        Ok(FeatureCache {
            dir: dir.to_path_buf(),
            model: h,
        })
    }

    /// Where the features of `seqs` live: the file name is their key.
    pub fn path(&self, tap: &FeatureTap, seqs: &[Vec<u32>]) -> PathBuf {
        let mut h = self.model.clone();
        h.update(format!("{tap:?} {FORMAT} {}", env!("CARGO_PKG_VERSION")).as_bytes());
        h.update((seqs.len() as u64).to_le_bytes());
        for s in seqs {
            h.update((s.len() as u64).to_le_bytes());
            for t in s {
                h.update(t.to_le_bytes());
            }
        }
        let key: String = h.finalize()[..12].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{key}.f32"))
    }
}

/// The cached features of sequences of these lengths, `width` floats per
/// token; `None` when the file is missing or does not fit them.
pub fn load(path: &Path, lens: &[usize], width: usize) -> Result<Option<Vec<Vec<f32>>>> {
    let Ok(file) = File::open(path) else {
        return Ok(None);
    };
    let mut r = BufReader::with_capacity(1 << 22, file);
    let mut head = [0u8; 24];
    r.read_exact(&mut head)?;
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap()) as usize;
    if &head[..8] != MAGIC || word(8) != lens.len() || word(16) != width {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(lens.len());
    let mut bytes = Vec::new();
    for &len in lens {
        bytes.resize(len * width * 4, 0);
        r.read_exact(&mut bytes)
            .with_context(|| format!("{} is cut short", path.display()))?;
        out.push(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        );
    }
    if r.read(&mut [0u8; 1])? != 0 {
        bail!("{} is longer than its sequences", path.display());
    }
    Ok(Some(out))
}

/// Writes `features` (`width` floats per token) to `path`.
pub fn save(path: &Path, features: &[Vec<f32>], width: usize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}-{:x}", std::process::id(), rand::random::<u32>()));
    let mut w = BufWriter::with_capacity(1 << 22, File::create(&tmp)?);
    w.write_all(MAGIC)?;
    w.write_all(&(features.len() as u64).to_le_bytes())?;
    w.write_all(&(width as u64).to_le_bytes())?;
    for f in features {
        let bytes: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_all(&bytes)?;
    }
    w.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_come_back_exactly_and_only_for_their_shapes() {
        let dir = std::env::temp_dir().join(format!("hs-featcache-{}", std::process::id()));
        let path = dir.join("x.f32");
        let feats = vec![vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e7], vec![0.25, 7.0]];
        save(&path, &feats, 2).unwrap();
        assert_eq!(load(&path, &[2, 1], 2).unwrap(), Some(feats));
        assert_eq!(load(&path, &[2, 1], 1).unwrap(), None, "another width");
        assert_eq!(load(&path, &[2], 2).unwrap(), None, "another count");
        assert!(load(&path, &[2, 2], 2).is_err(), "longer sequences than stored");
        assert!(load(&path, &[1, 1], 2).is_err(), "shorter sequences than stored");
        assert_eq!(load(&dir.join("none.f32"), &[1], 2).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_key_changes_with_the_tokens_and_the_tap() {
        let dir = std::env::temp_dir().join(format!("hs-featkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("model.bin");
        std::fs::write(&model, b"weights").unwrap();
        let cache = FeatureCache::open(&dir, &model).unwrap();
        let a = cache.path(&FeatureTap::Final, &[vec![1, 2, 3]]);
        assert_eq!(a, cache.path(&FeatureTap::Final, &[vec![1, 2, 3]]));
        assert_ne!(a, cache.path(&FeatureTap::Final, &[vec![1, 2, 4]]));
        assert_ne!(a, cache.path(&FeatureTap::Final, &[vec![1, 2], vec![3]]));
        assert_ne!(a, cache.path(&FeatureTap::Layers(vec![1]), &[vec![1, 2, 3]]));
        std::fs::write(&model, b"other weights").unwrap();
        let other = FeatureCache::open(&dir, &model).unwrap();
        assert_ne!(a, other.path(&FeatureTap::Final, &[vec![1, 2, 3]]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
