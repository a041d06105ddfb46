//! The draft head's training set as token ids: each record is a prompt (the
//! chat template applied) and the target's answer to it, greedy or sampled.
//!
//! Invariants: a file holds ids of one tokenizer (its vocabulary size is in
//! the header and every id is below it); a `(prompt, temperature)` pair
//! appears once, so generating again only adds what is missing; a record's
//! `group` is the hash of the conversation's first prompt, so a prompt's
//! greedy and sampled answers and its follow-up turns fall on the same side
//! of the held-out split. Features are never stored: they are recomputed
//! from the ids.
//!
//! On disk: zstd of `MAGIC`, `u32` vocabulary size, `u8` id width (2 when
//! the vocabulary fits in `u16`, else 4), `u32` category count and each
//! category (`u16` length, UTF-8), `u32` record count, then per record:
//! `u16` category index, `u16` temperature in thousandths, `u64` group,
//! `u32` prompt length, `u32` answer length and the ids. All little-endian.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

const MAGIC: &[u8; 8] = b"HSDRAFT1";

/// One prompt and the target's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftRecord {
    pub category: String,
    /// 0 for greedy.
    pub temperature: f32,
    /// Hash of the conversation's first prompt (the split is by group).
    pub group: u64,
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
}

impl DraftRecord {
    /// Whether the record is in the held-out split (5% of groups).
    pub fn held_out(&self) -> bool {
        // FNV's low bits follow its input's; a finaliser spreads them.
        let mut z = self.group;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % 20 == 0
    }
}

/// Stable hash of token ids (FNV-1a over the little-endian bytes).
pub fn group_of(ids: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ids.iter().flat_map(|i| i.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn temperature_key(t: f32) -> u16 {
    (t * 1000.0).round().clamp(0.0, u16::MAX as f32) as u16
}

/// The records of one target's tokenizer.
#[derive(Debug, Clone, Default)]
pub struct DraftDataset {
    pub vocab_size: usize,
    pub records: Vec<DraftRecord>,
    /// `(prompt, temperature key)` -> index in `records`.
    keys: HashMap<(Vec<u32>, u16), usize>,
}

impl DraftDataset {
    pub fn new(vocab_size: usize) -> Self {
        DraftDataset {
            vocab_size,
            ..Default::default()
        }
    }

    /// The dataset at `path`, or an empty one when there is no file.
    pub fn load_or_new(path: &Path, vocab_size: usize) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::new(vocab_size));
        }
        let data = Self::load(path)?;
        if data.vocab_size != vocab_size {
            bail!(
                "{} holds ids of a {}-token vocabulary, the model has {vocab_size}",
                path.display(),
                data.vocab_size
            );
        }
        Ok(data)
    }

    pub fn contains(&self, prompt: &[u32], temperature: f32) -> bool {
        self.keys.contains_key(&(prompt.to_vec(), temperature_key(temperature)))
    }

    /// Adds `record` unless its prompt and temperature are already there;
    /// says whether it was added.
    pub fn push(&mut self, record: DraftRecord) -> Result<bool> {
        if let Some(&bad) = record
            .prompt
            .iter()
            .chain(&record.answer)
            .find(|&&t| t as usize >= self.vocab_size)
        {
            bail!("token id {bad} is outside the {}-token vocabulary", self.vocab_size);
        }
        let key = (record.prompt.clone(), temperature_key(record.temperature));
        if self.keys.contains_key(&key) {
            return Ok(false);
        }
        self.keys.insert(key, self.records.len());
        self.records.push(record);
        Ok(true)
    }

    /// The greedy answer recorded for `prompt`.
    pub fn greedy_answer(&self, prompt: &[u32]) -> Option<&[u32]> {
        self.keys
            .get(&(prompt.to_vec(), 0))
            .map(|&i| &self.records[i].answer[..])
    }

    /// Answer tokens in the dataset.
    pub fn answer_tokens(&self) -> usize {
        self.records.iter().map(|r| r.answer.len()).sum()
    }

    /// Writes the dataset at zstd `level` (to a temporary file renamed over
    /// `path`, so an interrupted run leaves the previous file whole).
    pub fn save(&self, path: &Path, level: i32) -> Result<()> {
        let mut raw = Vec::new();
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&(self.vocab_size as u32).to_le_bytes());
        let wide = self.vocab_size > u16::MAX as usize + 1;
        raw.push(if wide { 4 } else { 2 });
        let mut categories: Vec<&str> = Vec::new();
        let mut index: HashMap<&str, u16> = HashMap::new();
        for r in &self.records {
            if !index.contains_key(r.category.as_str()) {
                index.insert(&r.category, categories.len() as u16);
                categories.push(&r.category);
            }
        }
        raw.extend_from_slice(&(categories.len() as u32).to_le_bytes());
        for c in &categories {
            raw.extend_from_slice(&(c.len() as u16).to_le_bytes());
            raw.extend_from_slice(c.as_bytes());
        }
        raw.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        for r in &self.records {
            raw.extend_from_slice(&index[r.category.as_str()].to_le_bytes());
            raw.extend_from_slice(&temperature_key(r.temperature).to_le_bytes());
            raw.extend_from_slice(&r.group.to_le_bytes());
            raw.extend_from_slice(&(r.prompt.len() as u32).to_le_bytes());
            raw.extend_from_slice(&(r.answer.len() as u32).to_le_bytes());
            for &t in r.prompt.iter().chain(&r.answer) {
                if wide {
                    raw.extend_from_slice(&t.to_le_bytes());
                } else {
                    raw.extend_from_slice(&(t as u16).to_le_bytes());
                }
            }
        }
        let packed = zstd::encode_all(&raw[..], level).context("compressing the dataset")?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&packed)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let packed = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut raw = Vec::new();
        zstd::Decoder::new(&packed[..])
            .and_then(|mut d| d.read_to_end(&mut raw))
            .with_context(|| format!("{}: not a zstd stream", path.display()))?;
        Self::parse(&raw).with_context(|| format!("{}: not a draft dataset", path.display()))
    }

    fn parse(raw: &[u8]) -> Result<Self> {
        let mut r = Reader { raw, at: 0 };
        if r.take(8)? != MAGIC {
            bail!("bad magic");
        }
        let vocab_size = r.u32()? as usize;
        let width = r.take(1)?[0];
        if width != 2 && width != 4 {
            bail!("id width {width}");
        }
        let categories = (0..r.u32()?)
            .map(|_| {
                let n = r.u16()? as usize;
                Ok(String::from_utf8(r.take(n)?.to_vec())?)
            })
            .collect::<Result<Vec<String>>>()?;
        let mut data = Self::new(vocab_size);
        for _ in 0..r.u32()? {
            let category = categories
                .get(r.u16()? as usize)
                .context("category index out of range")?
                .clone();
            let temperature = r.u16()? as f32 / 1000.0;
            let group = r.u64()?;
            let (np, na) = (r.u32()? as usize, r.u32()? as usize);
            let mut ids = (0..np + na).map(|_| if width == 2 { r.u16().map(u32::from) } else { r.u32() });
            let prompt = ids.by_ref().take(np).collect::<Result<Vec<u32>>>()?;
            let answer = ids.collect::<Result<Vec<u32>>>()?;
            if !data.push(DraftRecord {
                category,
                temperature,
                group,
                prompt,
                answer,
            })? {
                bail!("a prompt is recorded twice at one temperature");
            }
        }
        if r.at != raw.len() {
            bail!("{} trailing bytes", raw.len() - r.at);
        }
        Ok(data)
    }
}

struct Reader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self.raw.get(self.at..self.at + n).context("truncated")?;
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(category: &str, temperature: f32, prompt: Vec<u32>, answer: Vec<u32>) -> DraftRecord {
        DraftRecord {
            category: category.into(),
            temperature,
            group: group_of(&prompt),
            prompt,
            answer,
        }
    }

    #[test]
    fn a_saved_dataset_loads_back_equal_and_refuses_duplicates() {
        for vocab in [49_152, 262_144] {
            let mut d = DraftDataset::new(vocab);
            assert!(d.push(record("chat", 0.0, vec![1, 2, 3], vec![4, 5])).unwrap());
            assert!(d.push(record("code", 0.7, vec![1, 2, 3], vec![9])).unwrap());
            assert!(d.push(record("chat", 0.0, vec![7], vec![(vocab - 1) as u32])).unwrap());
            assert!(!d.push(record("chat", 0.0, vec![1, 2, 3], vec![6])).unwrap());
            assert!(d.push(record("chat", 0.0, vec![1], vec![vocab as u32])).is_err());
            let path = std::env::temp_dir().join(format!("hs-dataset-{}-{vocab}.hsd", std::process::id()));
            d.save(&path, 3).unwrap();
            let back = DraftDataset::load(&path).unwrap();
            assert_eq!(back.records, d.records);
            assert_eq!(back.vocab_size, vocab);
            assert!(back.contains(&[1, 2, 3], 0.7) && !back.contains(&[1, 2, 3], 0.5));
            assert_eq!(back.greedy_answer(&[1, 2, 3]), Some(&[4, 5][..]));
            assert!(DraftDataset::load_or_new(&path, vocab + 1).is_err());
            std::fs::write(&path, b"not zstd").unwrap();
            assert!(DraftDataset::load(&path).is_err());
            let _ = std::fs::remove_file(&path);
        }
    }

    #[test]
    fn about_one_group_in_twenty_is_held_out() {
        let held = (0..10_000u32)
            .filter(|&i| {
                let p = vec![i, i + 1];
                record("chat", 0.0, p, vec![]).held_out()
            })
            .count();
        assert!((400..600).contains(&held), "{held}");
    }
}
