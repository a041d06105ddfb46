//! The GPU path (feature `cuda`): the target's forward pass and its paged
//! KV storage on a CUDA device.
//!
//! cudarc loads the driver (`libcuda.so`) and NVRTC (`libnvrtc.so`) when a
//! device is opened, so this builds and links with no CUDA toolkit; the
//! kernels (`kernels.cu`) are compiled at start-up for the GPU that is there.
//! Weights are dequantized to f32 once at load. Every kernel computes a row
//! from that row alone in a fixed order (see `kernels.cu`), so tree
//! verification stays token-identical to plain decoding, as on the CPU.
//! One forward uploads the new tokens' embeddings, RoPE tables, KV slots and
//! key lists, runs every layer on the device, and brings back only the
//! logits rows asked for (and a draft head's features). Sampling stays on
//! the host.
//!
//! The forward is written against [`Backend`]: [`Gpu`] runs it on CUDA; the
//! tests also run it on a CPU emulation of the same kernel source
//! (`emulator`), which checks the kernels and their launches here, where
//! there is no GPU, against the CPU model.

use std::sync::Arc;

use candle_core::quantized::QTensor;

use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::KvLayout;
use crate::model::{copy_layer_taps, FeatureTap, ModelTensors};
use crate::ops::RopeTable;

#[cfg(test)]
mod emulator;
mod gpu;

#[cfg(test)]
pub(crate) use emulator::Emulator;
pub use gpu::{compile_kernels, Gpu, KernelImage};

/// The kernels' source, compiled by NVRTC when a device is opened.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block of every kernel (`GEMM_THREADS`, `ROW_THREADS`,
/// `ATTN_THREADS` in `kernels.cu`); the GEMM's output tile is `TILE`
/// square.
const BLOCK_THREADS: u32 = 256;
const TILE: usize = 64;
/// Ints per token in the attention key description.
const KEY_FIELDS: usize = 6;
/// CUDA's limit on a grid's second dimension (attention: one row per token).
const MAX_GRID_Y: usize = 65_535;

/// A kernel launch's grid and block dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

impl Grid {
    const BLOCK: (u32, u32, u32) = (BLOCK_THREADS, 1, 1);

    /// `matmul_nt`: one block per 64 x 64 output tile.
    fn matmul(m: usize, n: usize) -> Self {
        Grid {
            grid: (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1),
            block: Self::BLOCK,
        }
    }

    /// `rms_norm`: one block per row.
    fn rows(rows: usize) -> Self {
        Grid {
            grid: (rows as u32, 1, 1),
            block: Self::BLOCK,
        }
    }

    /// Element-wise kernels: one thread per element.
    fn elements(n: usize) -> Self {
        Grid {
            grid: ((n as u32).div_ceil(BLOCK_THREADS).max(1), 1, 1),
            block: Self::BLOCK,
        }
    }

    /// `paged_attention`: one block per (query head, token).
    fn attention(heads: usize, tokens: usize) -> Self {
        Grid {
            grid: (heads as u32, tokens as u32, 1),
            block: Self::BLOCK,
        }
    }
}

/// The geometry of one attention launch.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub tokens: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl AttentionShape {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// A device the forward runs on: its buffers and the kernels of
/// `kernels.cu`, one method per kernel (row-major; weights `(out, in)`).
pub trait Backend: Send + Sync {
    /// A buffer of f32 on the device.
    type Floats: Send + Sync;
    /// A buffer of i32 on the device.
    type Ints: Send + Sync;

    fn upload(&self, host: &[f32]) -> Result<Self::Floats>;
    fn upload_ints(&self, host: &[i32]) -> Result<Self::Ints>;
    fn zeros(&self, len: usize) -> Result<Self::Floats>;
    /// The first `len` floats, after all work queued before.
    fn download(&self, buf: &Self::Floats, len: usize) -> Result<Vec<f32>>;
    /// `c (m, n) = a (m, k) . w (n, k)^T`, or `c +=` that.
    fn matmul(
        &self,
        a: &Self::Floats,
        w: &Self::Floats,
        c: &mut Self::Floats,
        mnk: (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()>;
    /// Row-wise RMSNorm of `(rows, dim)` into `out`.
    fn rms_norm(
        &self,
        x: &Self::Floats,
        weight: &Self::Floats,
        out: &mut Self::Floats,
        rows_dim: (usize, usize),
        eps: f32,
    ) -> Result<()>;
    /// RoPE on `x (tokens, heads, 2 half)` with tables `(tokens, half)`.
    fn rope(
        &self,
        x: &mut Self::Floats,
        cos: &Self::Floats,
        sin: &Self::Floats,
        tokens_heads_half: (usize, usize, usize),
    ) -> Result<()>;
    /// `gate <- silu(gate) * up` on `len` floats.
    fn silu_mul(&self, gate: &mut Self::Floats, up: &Self::Floats, len: usize) -> Result<()>;
    /// `out[r] = x[rows[r]]`, `count` rows of `dim`.
    fn gather_rows(
        &self,
        x: &Self::Floats,
        rows: &Self::Ints,
        out: &mut Self::Floats,
        count_dim: (usize, usize),
    ) -> Result<()>;
    /// `cache[slots[r]] = rows[r]`, `count` rows of `dim`.
    fn scatter_rows(
        &self,
        cache: &mut Self::Floats,
        rows: &Self::Floats,
        slots: &Self::Ints,
        count_dim: (usize, usize),
    ) -> Result<()>;
    /// Paged attention of `q (tokens, heads, head_dim)` into `out` over one
    /// layer's K/V, each token's keys as [`AttentionKeys`] lists them
    /// (uploaded: keys, tables, lists, run slots).
    fn attention(
        &self,
        q: &Self::Floats,
        kv: (&Self::Floats, &Self::Floats),
        out: &mut Self::Floats,
        keys: &[Self::Ints; 4],
        shape: AttentionShape,
    ) -> Result<()>;
}

fn int(v: usize) -> i32 {
    i32::try_from(v).expect("GPU sizes fit in 32 bits")
}

/// Which KV slots each new token of a batch attends, in the order the CPU
/// path visits them: cached positions (through the block table), then the
/// extra slots and masked-in run tokens, then a causal run's tokens up to
/// itself. See `paged_attention` in `kernels.cu` for the layout.
#[derive(Debug, Default, PartialEq)]
pub struct AttentionKeys {
    /// Per token: num_cached, table offset, list offset, list count, run
    /// offset, run count.
    pub keys: Vec<i32>,
    pub tables: Vec<i32>,
    pub lists: Vec<i32>,
    pub run_slots: Vec<i32>,
}

impl AttentionKeys {
    pub fn new(batch: &RaggedBatch) -> Self {
        let mut k = AttentionKeys::default();
        for seq in &batch.seqs {
            let table_offset = int(k.tables.len());
            k.tables.extend(seq.block_table.iter().map(|b| int(b.index())));
            let run_offset = int(k.run_slots.len());
            k.run_slots.extend(seq.slots.iter().map(|&s| int(s)));
            for i in 0..seq.len() {
                let list_offset = k.lists.len();
                if let Some(extra) = seq.extra_slots.get(i) {
                    k.lists.extend(extra.iter().map(|&s| int(s)));
                }
                let run_count = if seq.mask.is_some() {
                    let seen = (0..seq.len()).filter(|&j| seq.attends(i, j));
                    k.lists.extend(seen.map(|j| int(seq.slots[j])));
                    0
                } else {
                    i + 1
                };
                let fields: [i32; KEY_FIELDS] = [
                    int(seq.num_cached),
                    table_offset,
                    int(list_offset),
                    int(k.lists.len() - list_offset),
                    run_offset,
                    int(run_count),
                ];
                k.keys.extend(fields);
            }
        }
        k
    }

    /// The slots token `t` attends, in order (what the kernel walks).
    #[cfg(test)]
    fn slots_of(&self, t: usize, block_size: usize) -> Vec<usize> {
        let d: Vec<usize> = self.keys[t * KEY_FIELDS..(t + 1) * KEY_FIELDS]
            .iter()
            .map(|&v| v as usize)
            .collect();
        let (num_cached, table, list, list_count, run, run_count) = (d[0], d[1], d[2], d[3], d[4], d[5]);
        let cached =
            (0..num_cached).map(|p| self.tables[table + p / block_size] as usize * block_size + p % block_size);
        let listed = self.lists[list..list + list_count].iter().map(|&s| s as usize);
        let ran = self.run_slots[run..run + run_count].iter().map(|&s| s as usize);
        cached.chain(listed).chain(ran).collect()
    }
}

/// A model's device copy, whichever backend holds it (the tests' CPU
/// emulation too, so the whole engine runs over the emulated kernels).
pub enum DeviceModel {
    Cuda(GpuModel<Gpu>),
    #[cfg(test)]
    Emulated(GpuModel<emulator::Emulator>),
}

/// KV storage on the device of a [`DeviceModel`].
pub enum DeviceStorage {
    Cuda(DeviceKv<Gpu>),
    #[cfg(test)]
    Emulated(DeviceKv<emulator::Emulator>),
}

impl DeviceModel {
    pub fn device(&self) -> crate::Device {
        match self {
            DeviceModel::Cuda(m) => crate::Device::Cuda(m.backend().ordinal()),
            #[cfg(test)]
            DeviceModel::Emulated(_) => crate::Device::Cuda(0),
        }
    }

    pub fn new_kv(&self, layout: KvLayout) -> Result<DeviceStorage> {
        Ok(match self {
            DeviceModel::Cuda(m) => DeviceStorage::Cuda(DeviceKv::new(m.backend().clone(), layout)?),
            #[cfg(test)]
            DeviceModel::Emulated(m) => DeviceStorage::Emulated(DeviceKv::new(m.backend().clone(), layout)?),
        })
    }

    pub fn logits_from_features(&self, features: &[f32]) -> Result<Vec<f32>> {
        match self {
            DeviceModel::Cuda(m) => m.logits_from_features(features),
            #[cfg(test)]
            DeviceModel::Emulated(m) => m.logits_from_features(features),
        }
    }

    /// [`GpuModel::forward`] over storage of the same device.
    pub fn forward(
        &self,
        x: &[f32],
        batch: &RaggedBatch,
        kv: &mut DeviceStorage,
        num_layers: usize,
        tap: Option<&FeatureTap>,
        logits_rows: &[usize],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        #[allow(unreachable_patterns)]
        match (self, kv) {
            (DeviceModel::Cuda(m), DeviceStorage::Cuda(kv)) => m.forward(x, batch, kv, num_layers, tap, logits_rows),
            #[cfg(test)]
            (DeviceModel::Emulated(m), DeviceStorage::Emulated(kv)) => {
                m.forward(x, batch, kv, num_layers, tap, logits_rows)
            }
            _ => Err(EngineError::Config("KV storage of another device".into())),
        }
    }
}

impl DeviceStorage {
    pub fn copy_slots(&mut self, src: &[usize], dst: &[usize]) -> Result<()> {
        match self {
            DeviceStorage::Cuda(kv) => kv.copy_slots(src, dst),
            #[cfg(test)]
            DeviceStorage::Emulated(kv) => kv.copy_slots(src, dst),
        }
    }
}

/// Paged K/V of every layer in device memory, laid out as the CPU's.
pub struct DeviceKv<B: Backend = Gpu> {
    backend: Arc<B>,
    keys: Vec<B::Floats>,
    values: Vec<B::Floats>,
    kv_size: usize,
    block_size: usize,
}

impl<B: Backend> DeviceKv<B> {
    pub fn new(backend: Arc<B>, layout: KvLayout) -> Result<Self> {
        let per_layer = layout.num_slots() * layout.kv_size;
        let alloc = || {
            (0..layout.num_layers)
                .map(|_| backend.zeros(per_layer))
                .collect::<Result<Vec<_>>>()
        };
        let (keys, values) = (alloc()?, alloc()?);
        Ok(DeviceKv {
            backend,
            keys,
            values,
            kv_size: layout.kv_size,
            block_size: layout.block_size,
        })
    }

    /// Copies the K/V at `src` slots to `dst` slots in every layer (all
    /// reads before any write).
    pub fn copy_slots(&mut self, src: &[usize], dst: &[usize]) -> Result<()> {
        let pairs: Vec<(usize, usize)> = src
            .iter()
            .copied()
            .zip(dst.iter().copied())
            .filter(|(s, d)| s != d)
            .collect();
        if pairs.is_empty() {
            return Ok(());
        }
        let b = &self.backend;
        let src = b.upload_ints(&pairs.iter().map(|&(s, _)| int(s)).collect::<Vec<_>>())?;
        let dst = b.upload_ints(&pairs.iter().map(|&(_, d)| int(d)).collect::<Vec<_>>())?;
        let mut rows = b.zeros(pairs.len() * self.kv_size)?;
        for cache in self.keys.iter_mut().chain(self.values.iter_mut()) {
            b.gather_rows(cache, &src, &mut rows, (pairs.len(), self.kv_size))?;
            b.scatter_rows(cache, &rows, &dst, (pairs.len(), self.kv_size))?;
        }
        Ok(())
    }

    /// One token's K and V of `layer` at `slot`.
    #[cfg(test)]
    fn read(&self, layer: usize, slot: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = self.kv_size;
        let k = self.backend.download(&self.keys[layer], (slot + 1) * n)?;
        let v = self.backend.download(&self.values[layer], (slot + 1) * n)?;
        Ok((k[slot * n..].to_vec(), v[slot * n..].to_vec()))
    }
}

struct DeviceLayer<F> {
    attn_norm: F,
    wq: F,
    wk: F,
    wv: F,
    wo: F,
    ffn_norm: F,
    w_gate: F,
    w_up: F,
    w_down: F,
}

/// The target's weights on the device, f32.
pub struct GpuModel<B: Backend = Gpu> {
    backend: Arc<B>,
    config: ModelConfig,
    layers: Vec<DeviceLayer<B::Floats>>,
    output_norm: B::Floats,
    lm_head: B::Floats,
}

impl<B: Backend> GpuModel<B> {
    /// Dequantizes and uploads every weight of `t` (shapes are checked by
    /// the CPU model built from the same tensors).
    pub fn new(backend: Arc<B>, t: &ModelTensors) -> Result<Self> {
        let config = t.config.clone();
        if config.head_dim > BLOCK_THREADS as usize {
            return Err(EngineError::Config(format!(
                "the GPU path supports head dimensions up to {BLOCK_THREADS}, the model has {}",
                config.head_dim
            )));
        }
        let upload = |name: &str| -> Result<B::Floats> {
            let q: &QTensor = t.tensors.get(name).ok_or_else(|| EngineError::BadTensor {
                name: name.to_string(),
                reason: "missing".into(),
            })?;
            let f = q
                .dequantize(&candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            backend.upload(&f)
        };
        let layers = (0..config.num_layers)
            .map(|i| {
                let p = |n: &str| format!("blk.{i}.{n}.weight");
                Ok(DeviceLayer {
                    attn_norm: upload(&p("attn_norm"))?,
                    wq: upload(&p("attn_q"))?,
                    wk: upload(&p("attn_k"))?,
                    wv: upload(&p("attn_v"))?,
                    wo: upload(&p("attn_output"))?,
                    ffn_norm: upload(&p("ffn_norm"))?,
                    w_gate: upload(&p("ffn_gate"))?,
                    w_up: upload(&p("ffn_up"))?,
                    w_down: upload(&p("ffn_down"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Tied embeddings: without `output.weight` the embedding matrix is reused.
        let head = if t.tensors.contains_key("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        Ok(GpuModel {
            output_norm: upload("output_norm.weight")?,
            lm_head: upload(head)?,
            backend,
            config,
            layers,
        })
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The output layer on rows that are already normed, `(rows, vocab)`.
    pub fn logits_from_features(&self, features: &[f32]) -> Result<Vec<f32>> {
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let rows = features.len() / h;
        let b = &self.backend;
        let x = b.upload(features)?;
        let mut logits = b.zeros(rows * vocab)?;
        b.matmul(&x, &self.lm_head, &mut logits, (rows, vocab, h), false)?;
        b.download(&logits, rows * vocab)
    }

    /// The ragged forward of [`crate::Model`] on the device: `x` holds the
    /// new tokens' embeddings, `logits_rows` the token indices that want
    /// logits. Returns logits `(rows, vocab)` and the features of `tap`.
    pub fn forward(
        &self,
        x: &[f32],
        batch: &RaggedBatch,
        kv: &mut DeviceKv<B>,
        num_layers: usize,
        tap: Option<&FeatureTap>,
        logits_rows: &[usize],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = &self.config;
        let b = &*self.backend;
        let n = batch.num_tokens();
        if n > MAX_GRID_Y {
            return Err(EngineError::Config(format!(
                "a GPU forward takes at most {MAX_GRID_Y} tokens, this one has {n}"
            )));
        }
        let (h, qs, kvs, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        let eps = c.rms_norm_eps;
        let positions = batch.seqs.iter().flat_map(|s| s.positions.iter().copied());
        let table = RopeTable::new(positions, c.head_dim, c.rope_theta);
        let (cos, sin, half) = (b.upload(&table.cos)?, b.upload(&table.sin)?, c.head_dim / 2);
        let slots: Vec<i32> = batch
            .seqs
            .iter()
            .flat_map(|s| s.slots.iter().map(|&v| int(v)))
            .collect();
        let slots = b.upload_ints(&slots)?;
        let keys = AttentionKeys::new(batch);
        let keys = [
            b.upload_ints(&keys.keys)?,
            b.upload_ints(&keys.tables)?,
            b.upload_ints(&keys.lists)?,
            b.upload_ints(&keys.run_slots)?,
        ];
        let shape = AttentionShape {
            tokens: n,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: kv.block_size,
        };

        let mut x = b.upload(x)?;
        let mut normed = b.zeros(n * h)?;
        let (mut q, mut k, mut v) = (b.zeros(n * qs)?, b.zeros(n * kvs)?, b.zeros(n * kvs)?);
        let mut attn = b.zeros(n * qs)?;
        let (mut gate, mut up) = (b.zeros(n * ff)?, b.zeros(n * ff)?);

        let taps: &[usize] = match tap {
            Some(FeatureTap::Layers(l)) => l,
            _ => &[],
        };
        let mut tapped = vec![0.0; if taps.is_empty() { 0 } else { n * taps.len() * h }];
        let mut take_taps = |x: &B::Floats, at: usize| -> Result<()> {
            if taps.contains(&at) {
                copy_layer_taps(&mut tapped, taps, &b.download(x, n * h)?, at, h);
            }
            Ok(())
        };

        for (li, layer) in self.layers.iter().take(num_layers).enumerate() {
            take_taps(&x, li)?;
            b.rms_norm(&x, &layer.attn_norm, &mut normed, (n, h), eps)?;
            b.matmul(&normed, &layer.wq, &mut q, (n, qs, h), false)?;
            b.matmul(&normed, &layer.wk, &mut k, (n, kvs, h), false)?;
            b.matmul(&normed, &layer.wv, &mut v, (n, kvs, h), false)?;
            b.rope(&mut q, &cos, &sin, (n, c.num_heads, half))?;
            b.rope(&mut k, &cos, &sin, (n, c.num_kv_heads, half))?;
            b.scatter_rows(&mut kv.keys[li], &k, &slots, (n, kvs))?;
            b.scatter_rows(&mut kv.values[li], &v, &slots, (n, kvs))?;
            b.attention(&q, (&kv.keys[li], &kv.values[li]), &mut attn, &keys, shape)?;
            b.matmul(&attn, &layer.wo, &mut x, (n, h, qs), true)?;
            b.rms_norm(&x, &layer.ffn_norm, &mut normed, (n, h), eps)?;
            b.matmul(&normed, &layer.w_gate, &mut gate, (n, ff, h), false)?;
            b.matmul(&normed, &layer.w_up, &mut up, (n, ff, h), false)?;
            b.silu_mul(&mut gate, &up, n * ff)?;
            b.matmul(&gate, &layer.w_down, &mut x, (n, h, ff), true)?;
        }
        take_taps(&x, num_layers)?;

        let final_features = tap == Some(&FeatureTap::Final);
        let features = if final_features {
            b.rms_norm(&x, &self.output_norm, &mut normed, (n, h), eps)?;
            b.download(&normed, n * h)?
        } else {
            tapped // empty without layer taps
        };
        let rows = logits_rows.len();
        if rows == 0 {
            return Ok((Vec::new(), features));
        }
        let row_ids = b.upload_ints(&logits_rows.iter().map(|&r| int(r)).collect::<Vec<_>>())?;
        let mut selected = b.zeros(rows * h)?;
        if final_features {
            b.gather_rows(&normed, &row_ids, &mut selected, (rows, h))?;
        } else {
            let mut picked = b.zeros(rows * h)?;
            b.gather_rows(&x, &row_ids, &mut picked, (rows, h))?;
            b.rms_norm(&picked, &self.output_norm, &mut selected, (rows, h), eps)?;
        }
        let mut logits = b.zeros(rows * c.vocab_size)?;
        b.matmul(&selected, &self.lm_head, &mut logits, (rows, c.vocab_size, h), false)?;
        Ok((b.download(&logits, rows * c.vocab_size)?, features))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SeqRun;
    use crate::kv::KvStorage;
    use crate::testing::random_tensors;
    use crate::{Device, Model, WeightFormat};
    use heterospec_kv::BlockId;

    const KERNEL_NAMES: [&str; 7] = [
        "matmul_nt",
        "rms_norm",
        "rope",
        "silu_mul",
        "gather_rows",
        "scatter_rows",
        "paged_attention",
    ];

    /// NVRTC compiles every kernel to PTX, and to machine code for Ampere
    /// and Hopper GPUs (its built-in ptxas checks registers and shared
    /// memory); no GPU needed (`.ci/run` installs NVRTC from PyPI).
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let text = match compile_kernels(None) {
            Ok(KernelImage::Ptx(text)) => text,
            other => panic!("PTX expected without an architecture: {other:?}"),
        };
        for name in KERNEL_NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "kernel {name} is not in the PTX"
            );
        }
        for arch in [(8, 0), (9, 0)] {
            let bytes = match compile_kernels(Some(arch)) {
                Ok(KernelImage::Cubin(bytes)) => bytes,
                Ok(KernelImage::Ptx(_)) => panic!("a CUBIN expected for sm_{}{}", arch.0, arch.1),
                Err(e) => panic!("{e}"),
            };
            assert_eq!(&bytes[..4], b"\x7fELF", "sm_{}{} image", arch.0, arch.1);
            for name in KERNEL_NAMES {
                let found = bytes.windows(name.len()).any(|w| w == name.as_bytes());
                assert!(found, "kernel {name} is not in the sm_{}{} image", arch.0, arch.1);
            }
        }
        let err = compile_kernels(Some((1, 0))).unwrap_err().to_string();
        assert!(err.contains("sm_10"), "{err}");
    }

    /// Two sequences with cache: a causal chunk with extras on one token,
    /// and a draft tree (mask) whose nodes also see earlier ancestors.
    fn mixed_batch(block_size: usize) -> RaggedBatch {
        let table: Vec<BlockId> = (1..=16).map(BlockId).collect();
        let mut causal = SeqRun::causal(vec![1, 2, 3], 5, &table, block_size).unwrap();
        causal.extra_slots = vec![vec![], vec![90, 91], vec![]];
        causal.logits_rows = vec![0, 2];
        let table: Vec<BlockId> = (17..=32).map(BlockId).collect();
        let mut tree = SeqRun::causal(vec![4, 5, 6, 7], 9, &table, block_size).unwrap();
        tree.slots = vec![80, 81, 82, 83];
        tree.positions = vec![9, 10, 10, 11];
        #[rustfmt::skip]
        let mask = vec![
            true,  false, false, false,
            true,  true,  false, false,
            true,  false, true,  false,
            true,  true,  false, true,
        ];
        tree.mask = Some(mask);
        tree.extra_slots = vec![vec![70]; 4];
        tree.logits_rows = vec![0, 1, 2, 3];
        let single = SeqRun::causal(vec![8], 0, &[BlockId(33)], block_size).unwrap();
        RaggedBatch {
            seqs: vec![causal, tree, single],
        }
    }

    /// The key lists the kernel walks are the CPU attention's, in its
    /// order: cached positions, extra slots, then the run tokens the token
    /// sees.
    #[test]
    fn attention_keys_list_what_the_cpu_attends_in_its_order() {
        for block_size in [1, 4, 16] {
            let batch = mixed_batch(block_size);
            let keys = AttentionKeys::new(&batch);
            let mut t = 0;
            for seq in &batch.seqs {
                for i in 0..seq.len() {
                    let mut want: Vec<usize> = (0..seq.num_cached).map(|p| seq.cached_slot(p, block_size)).collect();
                    want.extend(seq.extra_slots.get(i).into_iter().flatten());
                    want.extend((0..seq.len()).filter(|&j| seq.attends(i, j)).map(|j| seq.slots[j]));
                    assert_eq!(keys.slots_of(t, block_size), want, "token {t}, block size {block_size}");
                    t += 1;
                }
            }
            assert_eq!(keys.keys.len(), t * KEY_FIELDS);
        }
    }

    /// Shapes the GPU kernels meet on real models: head dimension 64,
    /// several GEMM tiles, more than one attention chunk of keys.
    fn gpu_config() -> ModelConfig {
        ModelConfig {
            num_layers: 3,
            hidden_size: 192,
            intermediate_size: 320,
            num_heads: 3,
            num_kv_heads: 1,
            head_dim: 64,
            vocab_size: 130,
            max_context: 1024,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
        }
    }

    /// A backend's forward driven as [`Model`] drives it: embeddings and
    /// logits rows from the CPU model of the same weights.
    struct OnDevice<B: Backend> {
        cpu: Model,
        device: GpuModel<B>,
    }

    impl<B: Backend> OnDevice<B> {
        fn new(backend: Arc<B>) -> Self {
            let tensors = random_tensors(&gpu_config(), 3).unwrap();
            let device = GpuModel::new(backend, &tensors).unwrap();
            OnDevice {
                cpu: Model::from_tensors(tensors, WeightFormat::F32).unwrap(),
                device,
            }
        }

        fn kv(&self, layout: KvLayout) -> DeviceKv<B> {
            DeviceKv::new(self.device.backend().clone(), layout).unwrap()
        }

        fn forward(
            &self,
            batch: &RaggedBatch,
            kv: &mut DeviceKv<B>,
            layers: usize,
            tap: Option<&FeatureTap>,
        ) -> (Vec<f32>, Vec<f32>) {
            let x = self
                .cpu
                .embed(batch.seqs.iter().flat_map(|s| s.token_ids.iter().copied()));
            let rows: Vec<usize> = batch.logits_token_rows().collect();
            self.device.forward(&x, batch, kv, layers, tap, &rows).unwrap()
        }
    }

    fn layout(block_size: usize) -> KvLayout {
        KvLayout {
            num_blocks: 128,
            block_size,
            num_layers: gpu_config().num_layers,
            kv_size: gpu_config().kv_size(),
            scratch_slots: 8,
        }
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-3, "{what}: max abs diff {worst}");
    }

    /// A long prompt (past 256 keys: two attention chunks), then the mixed
    /// batch (cache, extras, a tree) with both kinds of features, and a
    /// self-draft's first layer: the device's logits and features are the
    /// CPU model's up to f32 summation order; slot copies land; the output
    /// layer alone agrees.
    fn forward_matches_the_cpu<B: Backend>(backend: Arc<B>, block_sizes: &[usize], prompt_len: usize) {
        let dev = OnDevice::new(backend);
        let cpu = &dev.cpu;
        let layers = gpu_config().num_layers;
        for &block_size in block_sizes {
            let mut cpu_kv = KvStorage::new(layout(block_size));
            let mut dev_kv = dev.kv(layout(block_size));
            let prompt: Vec<u32> = (0..prompt_len).map(|i| (i * 7 % 130) as u32).collect();
            let table: Vec<BlockId> = (1..=prompt_len.div_ceil(block_size) as u32).map(BlockId).collect();
            // A prefill chunk that wants no logits, then the rest.
            let split = prompt_len - 40;
            let mut first = SeqRun::causal(prompt[..split].to_vec(), 0, &table, block_size).unwrap();
            first.logits_rows.clear();
            let batch = RaggedBatch { seqs: vec![first] };
            assert!(dev.forward(&batch, &mut dev_kv, layers, None).0.is_empty());
            assert!(cpu.forward(&batch, &mut cpu_kv).unwrap().is_empty());
            let rest = SeqRun::causal(prompt[split..].to_vec(), split, &table, block_size).unwrap();
            let batch = RaggedBatch {
                seqs: vec![rest.with_all_logits()],
            };
            let (b, _) = dev.forward(&batch, &mut dev_kv, layers, None);
            assert_close(&b, &cpu.forward(&batch, &mut cpu_kv).unwrap(), "long prompt");

            let batch = mixed_batch(block_size);
            for tap in [FeatureTap::Final, FeatureTap::Layers(vec![0, 2, 3])] {
                let (a, fa) = cpu.forward_with_features(&batch, &mut cpu_kv, &tap).unwrap();
                let (b, fb) = dev.forward(&batch, &mut dev_kv, layers, Some(&tap));
                assert_close(&b, &a, "mixed batch logits");
                assert_close(&fb, &fa, "features");
            }
            let (first, _) = dev.forward(&batch, &mut dev_kv, 1, None);
            assert_close(
                &first,
                &cpu.forward_layers(&batch, &mut cpu_kv, 1).unwrap(),
                "first layer only",
            );

            let before = dev_kv.read(2, 81).unwrap();
            let other = dev_kv.read(2, 82).unwrap();
            assert_ne!(before, other);
            dev_kv.copy_slots(&[81, 82], &[100, 101]).unwrap();
            assert_eq!(dev_kv.read(2, 100).unwrap(), before);
            assert_eq!(dev_kv.read(0, 101).unwrap().1.len(), gpu_config().kv_size());
            assert_eq!(dev_kv.read(2, 101).unwrap(), other);

            let features: Vec<f32> = (0..2 * 192).map(|i| (i as f32 * 0.37).sin()).collect();
            assert_close(
                &dev.device.logits_from_features(&features).unwrap(),
                &cpu.logits_from_features(&features).unwrap(),
                "output layer",
            );
        }
    }

    /// A token's logits are bit for bit the same alone and among 70 other
    /// tokens (two GEMM row tiles): what keeps speculation exact.
    fn rows_do_not_depend_on_the_batch<B: Backend>(backend: Arc<B>) {
        let dev = OnDevice::new(backend);
        let (bs, layers) = (16, gpu_config().num_layers);
        let prompt: Vec<u32> = (0..70).map(|i| (i * 11 % 130) as u32).collect();
        let table: Vec<BlockId> = (1..=5).map(BlockId).collect();
        let whole = SeqRun::causal(prompt.clone(), 0, &table, bs).unwrap().with_all_logits();
        let (all, _) = dev.forward(
            &RaggedBatch { seqs: vec![whole] },
            &mut dev.kv(layout(bs)),
            layers,
            None,
        );
        let vocab = gpu_config().vocab_size;
        for t in [0, 35, 69] {
            let mut kv = dev.kv(layout(bs));
            if t > 0 {
                let run = SeqRun::causal(prompt[..t].to_vec(), 0, &table, bs).unwrap();
                dev.forward(&RaggedBatch { seqs: vec![run] }, &mut kv, layers, None);
            }
            let run = SeqRun::causal(vec![prompt[t]], t, &table, bs).unwrap();
            let (alone, _) = dev.forward(&RaggedBatch { seqs: vec![run] }, &mut kv, layers, None);
            assert_eq!(alone, all[t * vocab..(t + 1) * vocab], "token {t}");
        }
    }

    /// The attention kernel alone against the CPU's, with spread-out
    /// scores (so later chunks raise the running maximum) over up to 700
    /// keys (three chunks), grouped query heads, the mixed batch's extras
    /// and tree.
    #[test]
    fn emulated_attention_matches_the_cpu_attention() {
        let (heads, kv_heads, hd, bs) = (4, 2, 64, 16);
        let lay = KvLayout {
            num_blocks: 64,
            block_size: bs,
            num_layers: 1,
            kv_size: kv_heads * hd,
            scratch_slots: 0,
        };
        let mut rng = crate::testing::Lcg(9);
        // Keys grow along positions, so the running maximum keeps rising.
        let slots = lay.num_slots();
        let k: Vec<f32> = (0..slots * lay.kv_size)
            .map(|i| rng.f() * (1.0 + (i / lay.kv_size) as f32 / 100.0))
            .collect();
        let v: Vec<f32> = (0..slots * lay.kv_size).map(|_| rng.f()).collect();
        let mut cpu_kv = KvStorage::new(lay);
        for s in 0..slots {
            let r = s * lay.kv_size..(s + 1) * lay.kv_size;
            cpu_kv.write(0, s, &k[r.clone()], &v[r]);
        }
        let mut batch = mixed_batch(bs);
        let table: Vec<BlockId> = (20..64).map(BlockId).collect();
        batch.seqs.push(SeqRun::causal(vec![1, 2], 700, &table, bs).unwrap());
        let n = batch.num_tokens();
        let q: Vec<f32> = (0..n * heads * hd).map(|_| rng.f() * 3.0).collect();
        let owners = batch.token_owners();
        let shape = crate::attention::HeadShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            block_size: bs,
        };
        let mut want = vec![0.0; n * heads * hd];
        crate::attention::paged_attention(&q, &batch, &owners, cpu_kv.layer(0), shape, &mut want);

        let e = emulator::Emulator;
        let keys = AttentionKeys::new(&batch);
        let keys = [&keys.keys, &keys.tables, &keys.lists, &keys.run_slots].map(|v| e.upload_ints(v).unwrap());
        let mut got = e.zeros(n * heads * hd).unwrap();
        let shape = AttentionShape {
            tokens: n,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            block_size: bs,
        };
        e.attention(&q, (&k, &v), &mut got, &keys, shape).unwrap();
        assert_close(&got, &want, "attention");
    }

    #[test]
    fn the_emulated_gpu_forward_matches_the_cpu_model() {
        forward_matches_the_cpu(Arc::new(emulator::Emulator), &[16], 260);
    }

    #[test]
    fn emulated_gpu_rows_do_not_depend_on_the_batch() {
        rows_do_not_depend_on_the_batch(Arc::new(emulator::Emulator));
    }

    /// The engine with its target on the emulated GPU: speculative greedy
    /// output (a self-draft running the target's first layer on the device,
    /// draft trees verified there, accepted nodes moved in device KV)
    /// equals plain greedy decoding on the same device, in batches of 2.
    #[test]
    fn an_engine_on_the_emulated_gpu_speculates_exactly() {
        use crate::engine::{DrafterKind, Engine, EngineConfig, SpecSetup};
        use crate::runner::{Runner, TokenRequest};
        use crate::spec::{CostCurve, SpecMode, SpecPolicy};
        use crate::testing::tiny_config;
        use crate::SamplingParams;

        let target = || {
            let t = random_tensors(&tiny_config(), 5).unwrap();
            Model::from_tensors_emulated(t, WeightFormat::AsShipped).unwrap()
        };
        let config = EngineConfig {
            block_size: 4,
            kv_cache_bytes: 1 << 20,
        };
        let requests = |speculation| -> Vec<TokenRequest> {
            [
                vec![3u32, 9, 27, 5, 1],
                vec![7; 9],
                (0..13).map(|i| i * 5 % 64).collect(),
            ]
            .into_iter()
            .map(|prompt| TokenRequest {
                prompt,
                sampling: SamplingParams::greedy(),
                speculation,
                max_new_tokens: 10,
                stop_token_ids: vec![],
            })
            .collect()
        };
        let mut plain = Engine::new(target(), config.clone()).unwrap();
        let want = Runner::new(&mut plain).run(&requests(SpecMode::Off), 2, 4).unwrap();
        let setup = SpecSetup {
            drafter: DrafterKind::SelfDraft { num_layers: 1 },
            policy: SpecPolicy {
                depth: 3,
                top_k: 2,
                num_nodes: 5,
                thresholds: vec![0.2, 0.5, 0.8, 1.2, 1.6, 2.0, 3.0],
                ..SpecPolicy::default()
            },
            verify_budget: None,
            cost_curve: Some(CostCurve::new(vec![(1, 1.0), (64, 1.2), (512, 10.0)])),
        };
        let mut spec = Engine::with_speculation(target(), config, Some(setup)).unwrap();
        let got = Runner::new(&mut spec).run(&requests(SpecMode::Fixed), 2, 4).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.token_ids, w.token_ids);
            // Batch-invariant kernels: the verified tokens' log-probabilities
            // are plain decoding's to the bit.
            assert_eq!(g.logprobs, w.logprobs);
        }
        let drafted: usize = got.iter().map(|o| o.stats.draft_tokens).sum();
        let accepted: usize = got.iter().map(|o| o.stats.accepted_tokens).sum();
        assert!(drafted > 0 && accepted > 0, "drafted {drafted}, accepted {accepted}");
    }

    fn gpu() -> Arc<Gpu> {
        let ordinal = match crate::testing::test_device() {
            Device::Cuda(i) => i,
            Device::Cpu => 0,
        };
        Gpu::open(ordinal).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    #[ignore = "needs a CUDA GPU: HETEROSPEC_TEST_DEVICE=cuda cargo test -- --ignored"]
    fn the_gpu_forward_matches_the_cpu_model() {
        forward_matches_the_cpu(gpu(), &[4, 16], 300);
        // Through `Model`: the device is chosen at load, KV comes from it.
        let (cpu, dev) = (
            Model::from_tensors(random_tensors(&gpu_config(), 4).unwrap(), WeightFormat::F32).unwrap(),
            Model::from_tensors_on(
                random_tensors(&gpu_config(), 4).unwrap(),
                WeightFormat::F32,
                Device::Cuda(gpu().ordinal()),
            )
            .unwrap(),
        );
        assert!(matches!(dev.device(), Device::Cuda(_)));
        let mut kv = dev.new_kv(layout(16)).unwrap();
        assert!(kv.is_on_device());
        let batch = mixed_batch(16);
        let want = cpu.forward(&batch, &mut cpu.new_kv(layout(16)).unwrap()).unwrap();
        assert_close(&dev.forward(&batch, &mut kv).unwrap(), &want, "Model on cuda");
        let err = dev
            .forward(&batch, &mut KvStorage::new(layout(16)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("device memory"), "{err}");
    }

    #[test]
    #[ignore = "needs a CUDA GPU: HETEROSPEC_TEST_DEVICE=cuda cargo test -- --ignored"]
    fn gpu_rows_do_not_depend_on_the_batch() {
        rows_do_not_depend_on_the_batch(gpu());
    }

    /// Without a driver, asking for a GPU is an error that says so (with
    /// one, the device opens and names itself).
    #[test]
    fn opening_a_device_gives_a_gpu_or_says_why() {
        // SAFETY: only tries to open the library.
        let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
        match Gpu::open(0) {
            Ok(gpu) => assert!(driver_present && format!("{gpu:?}").starts_with("cuda:0")),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    driver_present || msg.contains("no CUDA driver") && msg.contains("--device cpu"),
                    "{msg}"
                );
            }
        }
        let err = Gpu::open(1 << 20).unwrap_err().to_string();
        assert!(err.contains("CUDA"), "{err}");
    }
}
