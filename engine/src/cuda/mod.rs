//! The GPU path (feature `cuda`): the target's forward pass and its paged
//! KV storage on a CUDA device.
//!
//! cudarc loads the driver (`libcuda.so`) and NVRTC (`libnvrtc.so`) when a
//! device is opened, so this builds and links with no CUDA toolkit; the
//! kernels (`kernels.cu`) are compiled at start-up for the GPU that is there
//! (Ampere or newer: the GEMMs run on bf16 tensor cores).
//! Weight matrices are dequantized and rounded to bf16 once at load (norm
//! weights stay f32). Every kernel computes a row from that row alone in a
//! fixed order (see `kernels.cu`), so tree verification stays
//! token-identical to plain decoding, as on the CPU.
//! One forward uploads the new tokens' ids, RoPE tables, KV slots and key
//! lists, gathers the embeddings and runs every layer on the device, and
//! brings back only the logits rows asked for; a verify forward leaves
//! a draft head's final-norm features on the device (`features`), where
//! a head on the device stores them. Sampling stays on the host. A draft
//! head runs on the device too ([`DeviceHead`]), its rows' best ids found
//! there. Forwards of up to [`MAX_GRAPH_TOKENS`] tokens replay a CUDA
//! graph of their padded size (`graphs`) rather than queue each launch.
//!
//! The forward is written against [`Backend`] (one method per kernel):
//! [`Gpu`] runs it on CUDA; the tests also run it on a CPU emulation of the
//! same kernel source (`emulator`), which checks the kernels and their
//! launches here, where there is no GPU, against the CPU model.
//! [`GpuModel`] is the engine's model backend (`crate::backend::ModelBackend`)
//! over any kernel backend, and [`DeviceKv`] its KV storage.

use std::sync::Arc;

use crate::backend::{copy_layer_taps, FeatureTap, ModelBackend, Rows};
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::device_head::{HeadBackend, HeadParts};
use crate::error::{EngineError, Result};
use crate::features::Features;
use crate::kv::{KvLayout, KvStorage};
use crate::weights::{LayerTensor, ModelTensors, EMBEDDINGS, OUTPUT_NORM};

mod backend;
pub mod bench;
mod device_kv;
#[cfg(test)]
mod emulator;
mod features;
mod forward;
mod gpu;
mod graphs;
#[cfg(test)]
#[path = "greedy/tests.rs"]
mod greedy_tests;
mod grid;
mod head;
mod keys;
mod layer;
mod nvrtc;
pub mod synthetic;

pub use backend::Backend;
pub use device_kv::DeviceKv;
#[cfg(test)]
pub(crate) use emulator::Emulator;
use forward::{launch, Buffers, Shape, Taps};
pub use gpu::Gpu;
use graphs::Graphs;
pub use graphs::MAX_GRAPH_TOKENS;
pub use grid::{AttentionShape, Grid, KSplit};
pub use head::DeviceHead;
pub use keys::AttentionKeys;
use layer::{DeviceLayer, HostInputs, StepInputs};
pub use nvrtc::{compile_kernels, KernelImage, MIN_ARCH};

/// The kernels' source, compiled by NVRTC when a device is opened.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block of every kernel (`GEMM_THREADS`, `ROW_THREADS`,
/// `ATTN_THREADS` in `kernels.cu`); the GEMM's output tile is `TILE`
/// square, and it steps through k `TILE_K` at a time.
const BLOCK_THREADS: u32 = 256;
const TILE: usize = 64;
const TILE_K: usize = 32;
/// Ints per token in the attention key description.
const KEY_FIELDS: usize = 6;
/// CUDA's limit on a grid's second dimension (attention: one row per token).
const MAX_GRID_Y: usize = 65_535;

/// The bf16 bits of each value, rounded to nearest even (as the GEMM
/// kernel rounds its activations).
pub fn bf16_bits(host: &[f32]) -> Vec<u16> {
    host.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

fn int(v: usize) -> i32 {
    i32::try_from(v).expect("GPU sizes fit in 32 bits")
}

/// Opens CUDA device `ordinal` and loads `t`'s weights onto it.
/// The kernels run the plain llama block (RoPE frequency factors included:
/// the rotation table is built on the host); other blocks are refused
/// rather than given wrong logits.
fn refuse_other_blocks(c: &crate::config::ModelConfig) -> Result<()> {
    let b = c.block;
    let needs: Vec<&str> = [
        (b.qkv_bias, "q/k/v biases"),
        (b.qk_norm, "per-head q/k norms"),
        (b.rope_neox, "NeoX RoPE"),
        (b.embed_scale, "scaled embeddings"),
        (b.gelu, "GELU gating"),
        (b.post_norms, "post-norms"),
        (c.sliding_window.is_some(), "sliding-window attention"),
        (
            c.attn_scale_dim != c.head_dim,
            "a score scale other than the head dimension's",
        ),
    ]
    .into_iter()
    .filter_map(|(on, what)| on.then_some(what))
    .collect();
    if needs.is_empty() {
        return Ok(());
    }
    Err(EngineError::Device(format!(
        "the GPU path runs llama blocks; this model needs {}: run it with --device cpu",
        needs.join(", ")
    )))
}

pub fn open_model(ordinal: usize, t: &ModelTensors) -> Result<Box<dyn ModelBackend>> {
    refuse_other_blocks(&t.config)?;
    Ok(Box::new(GpuModel::new(Gpu::open(ordinal)?, t)?))
}

/// The target's weights on the device: matrices bf16, norms f32.
pub struct GpuModel<B: Backend = Gpu> {
    backend: Arc<B>,
    config: ModelConfig,
    layers: Vec<DeviceLayer<B::Floats, B::Halves>>,
    output_norm: B::Floats,
    lm_head: Arc<B::Halves>,
    /// The token embeddings, bf16; `None` where the output layer is tied
    /// to them (`lm_head` is the table).
    token_embd: Option<Arc<B::Halves>>,
    /// Forwards captured as CUDA graphs, and their buffers.
    graphs: std::sync::Mutex<Graphs<B>>,
}

impl<B: Backend> GpuModel<B> {
    /// Dequantizes and uploads every weight of `t`, matrices as bf16
    /// (names, shapes and the tied output from the shared description in
    /// `crate::weights`).
    pub fn new(backend: Arc<B>, t: &ModelTensors) -> Result<Self> {
        let config = t.config.clone();
        refuse_other_blocks(&config)?;
        if config.head_dim > BLOCK_THREADS as usize {
            return Err(EngineError::Config(format!(
                "the GPU path supports head dimensions up to {BLOCK_THREADS}, the model has {}",
                config.head_dim
            )));
        }
        let upload = |name: &str, shape: &[usize]| -> Result<B::Floats> { backend.upload(&t.get_f32(name, shape)?) };
        let matrix =
            |name: &str, shape: &[usize]| -> Result<B::Halves> { backend.upload_bf16(&t.get_f32(name, shape)?) };
        let layers = (0..config.num_layers)
            .map(|i| {
                let norm = |part: LayerTensor| upload(&part.name(i), &part.shape(&config));
                let mat = |part: LayerTensor| matrix(&part.name(i), &part.shape(&config));
                Ok(DeviceLayer {
                    attn_norm: Some(norm(LayerTensor::AttnNorm)?),
                    wq: mat(LayerTensor::Q)?,
                    wk: mat(LayerTensor::K)?,
                    wv: mat(LayerTensor::V)?,
                    wo: mat(LayerTensor::O)?,
                    ffn_norm: norm(LayerTensor::FfnNorm)?,
                    w_gate: mat(LayerTensor::Gate)?,
                    w_up: mat(LayerTensor::Up)?,
                    w_down: mat(LayerTensor::Down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (h, vocab) = (config.hidden_size, config.vocab_size);
        let tied = t.output_name() == EMBEDDINGS;
        Ok(GpuModel {
            output_norm: upload(OUTPUT_NORM, &[h])?,
            lm_head: Arc::new(matrix(t.output_name(), &[vocab, h])?),
            token_embd: if tied {
                None
            } else {
                Some(Arc::new(matrix(EMBEDDINGS, &[vocab, h])?))
            },
            backend,
            config,
            layers,
            graphs: std::sync::Mutex::new(Graphs::new(true)),
        })
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The token embedding table (the output layer's where they are tied).
    fn embeddings(&self) -> &Arc<B::Halves> {
        self.token_embd.as_ref().unwrap_or(&self.lm_head)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
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

    /// Whether forwards of frequent shapes run from CUDA graphs (on by
    /// default; off queues every launch, as `--enforce-eager` asks). A
    /// draft head placed on the device takes the setting when it is
    /// placed ([`ModelBackend::head_on_device`]), so set it before.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.lock().unwrap_or_else(|p| p.into_inner()).set_enabled(on);
    }

    /// Graphs captured so far.
    pub fn graph_captures(&self) -> usize {
        self.graphs.lock().unwrap_or_else(|p| p.into_inner()).captures()
    }

    /// The ragged forward of [`crate::Model`] on the device, from the
    /// batch's token ids (their embeddings gathered on the device);
    /// `logits_rows` are the token indices that want logits. Returns
    /// logits `(rows, vocab)` and the features of `tap`.
    pub fn forward_on(
        &self,
        batch: &RaggedBatch,
        kv: &mut DeviceKv<B>,
        num_layers: usize,
        tap: Option<&FeatureTap>,
        logits_rows: &[usize],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let len = logits_rows.len() * self.config.vocab_size;
        let download = |logits: &B::Floats| self.backend.download(logits, len);
        let (logits, features) = self.forward_device(batch, kv, num_layers, tap, logits_rows, download)?;
        Ok((logits.unwrap_or_default(), features.into_host()?))
    }

    /// [`forward_on`](Self::forward_on) through every layer for
    /// verification: the rows `pickable` marks come back as their greedy
    /// picks, found on the device (`greedy_rows`), the others whole; only
    /// those rows' logits are copied back. Final-norm features stay on the
    /// device.
    pub fn forward_picking(
        &self,
        batch: &RaggedBatch,
        kv: &mut DeviceKv<B>,
        tap: Option<&FeatureTap>,
        logits_rows: &[usize],
        pickable: &[bool],
    ) -> Result<(Rows, Features)> {
        let b = &*self.backend;
        let vocab = self.config.vocab_size;
        let rows = logits_rows.len();
        let picked = |r: usize| pickable.get(r).copied().unwrap_or(false);
        let read = |logits: &B::Floats| -> Result<Rows> {
            let found: Vec<(u32, f32)> = if (0..rows).any(picked) {
                let mut ids = b.upload_ints(&vec![0; rows])?;
                let mut logprobs = b.zeros(rows)?;
                b.greedy_rows(logits, &mut ids, &mut logprobs, (rows, vocab))?;
                let ids = b.download_ints(&ids, rows)?;
                ids.into_iter()
                    .map(|i| i as u32)
                    .zip(b.download(&logprobs, rows)?)
                    .collect()
            } else {
                Vec::new()
            };
            let whole: Vec<i32> = (0..rows).filter(|&r| !picked(r)).map(int).collect();
            let whole_logits = if whole.is_empty() {
                Vec::new()
            } else {
                let idx = b.upload_ints(&whole)?;
                let mut out = b.zeros(whole.len() * vocab)?;
                b.gather_rows(logits, &idx, &mut out, (whole.len(), vocab))?;
                b.download(&out, whole.len() * vocab)?
            };
            let picks = (0..rows).map(|r| picked(r).then(|| found[r]));
            Ok(Rows::mixed(vocab, whole_logits, picks))
        };
        let num_layers = self.config.num_layers;
        let (rows, features) = self.forward_device(batch, kv, num_layers, tap, logits_rows, read)?;
        Ok((rows.unwrap_or_else(|| Rows::whole(Vec::new(), vocab)), features))
    }

    /// The forward on the device; `read` takes the logits rows where they
    /// were left (not called without rows). Also returns the final-norm
    /// features of a `Final` tap on the device (layer taps come to the
    /// host). Runs from a graph where one serves ([`Graphs::takes`]).
    fn forward_device<T>(
        &self,
        batch: &RaggedBatch,
        kv: &mut DeviceKv<B>,
        num_layers: usize,
        tap: Option<&FeatureTap>,
        logits_rows: &[usize],
        read: impl FnOnce(&B::Floats) -> Result<T>,
    ) -> Result<(Option<T>, Features)> {
        let c = &self.config;
        let b = &*self.backend;
        let n = batch.num_tokens();
        if n > MAX_GRID_Y {
            return Err(EngineError::Config(format!(
                "a GPU forward takes at most {MAX_GRID_Y} tokens, this one has {n}"
            )));
        }
        let mut tokens = batch.seqs.iter().flat_map(|s| s.token_ids.iter().copied());
        if let Some(bad) = tokens.find(|&t| t as usize >= c.vocab_size) {
            return Err(EngineError::Config(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                c.vocab_size
            )));
        }
        let h = c.hidden_size;
        let host = HostInputs::new(batch, c);
        let taps: &[usize] = match tap {
            Some(FeatureTap::Layers(l)) => l,
            _ => &[],
        };
        let shape = Shape {
            tokens: n,
            rows: logits_rows.len(),
            num_layers,
            final_features: tap == Some(&FeatureTap::Final),
        };
        let device_features = |values: B::Floats| Features::Device {
            rows: Box::new(features::DeviceFeatures {
                backend: self.backend.clone(),
                values,
                len: n * h,
            }),
            tokens: n,
            width: h,
        };

        let mut graphs = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        if graphs.takes(n, !taps.is_empty()) {
            if let Some(buf) = graphs.run(self, kv, &host, logits_rows, shape)? {
                let out = (shape.rows > 0).then(|| read(&buf.logits)).transpose()?;
                // A copy: the next replay overwrites the graph's buffer.
                let features = match shape.final_features {
                    true => device_features(b.duplicate(&buf.scratch.normed, n * h)?),
                    false => Features::none(),
                };
                return Ok((out, features));
            }
        }
        drop(graphs);

        let step = StepInputs::upload(b, &host, c, kv.block_size)?;
        let mut buf = Buffers::new(b, c, step, n, shape.rows)?;
        buf.write_rows(b, &logits_rows.iter().map(|&r| int(r)).collect::<Vec<_>>())?;
        let mut tapped = vec![0.0; n * taps.len() * h];
        let mut take_taps = |x: &B::Floats, at: usize| -> Result<()> {
            if taps.contains(&at) {
                copy_layer_taps(&mut tapped, taps, &b.download(x, n * h)?, at, h);
            }
            Ok(())
        };
        let layer_taps: Option<Taps<'_, B::Floats>> = (!taps.is_empty()).then_some(&mut take_taps);
        launch(self, kv, &mut buf, shape, layer_taps)?;
        let out = (shape.rows > 0).then(|| read(&buf.logits)).transpose()?;
        let features = match shape.final_features {
            true => device_features(buf.scratch.normed),
            // Empty without layer taps.
            false => Features::host(tapped, taps.len() * h),
        };
        Ok((out, features))
    }
}

/// The device storage of `kv`, when it is a GPU backend's of this kind.
fn device_kv<B: Backend>(kv: &mut KvStorage) -> Result<&mut DeviceKv<B>> {
    kv.device_mut()
        .and_then(|d| d.as_any_mut().downcast_mut::<DeviceKv<B>>())
        .ok_or_else(|| EngineError::Config("a GPU model needs KV storage of its own device (Model::new_kv)".into()))
}

impl<B: Backend> ModelBackend for GpuModel<B> {
    fn device(&self) -> crate::Device {
        self.backend.device()
    }

    fn new_kv(&self, layout: KvLayout) -> Result<KvStorage> {
        let kv = DeviceKv::new(self.backend.clone(), layout)?;
        Ok(KvStorage::on_device(layout, Box::new(kv)))
    }

    fn embeds_tokens(&self) -> bool {
        true
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward_rows(
        &self,
        _x: Vec<f32>,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        tap: Option<&FeatureTap>,
        pickable: &[bool],
    ) -> Result<(Rows, Features)> {
        let kv = device_kv(kv)?;
        let rows: Vec<usize> = batch.logits_token_rows().collect();
        self.forward_picking(batch, kv, tap, &rows, pickable)
    }

    fn forward(
        &self,
        _x: Vec<f32>,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        num_layers: usize,
        tap: Option<&FeatureTap>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let kv = device_kv(kv)?;
        let rows: Vec<usize> = batch.logits_token_rows().collect();
        self.forward_on(batch, kv, num_layers, tap, &rows)
    }

    fn logits_from_features(&self, features: &[f32]) -> Result<Vec<f32>> {
        GpuModel::logits_from_features(self, features)
    }

    fn head_on_device(&self, parts: &HeadParts) -> Result<Option<Box<dyn HeadBackend>>> {
        let graphs = self.graphs.lock().unwrap_or_else(|p| p.into_inner()).enabled();
        let head = DeviceHead::new(self.backend.clone(), parts, self.embeddings().clone(), graphs)?;
        Ok(Some(Box::new(head)))
    }

    fn set_graphs(&self, on: bool) {
        GpuModel::set_graphs(self, on);
    }
}

#[cfg(test)]
mod tests;
