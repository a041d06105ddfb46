//! The llama-architecture model: weights from GGUF and the ragged forward.
//!
//! Linear layers run through candle's quantized matmul on all tokens of the
//! batch at once; norms, RoPE and the SiLU gate run on flat rows; attention
//! reads paged KV in place (see `attention`). Only the rows that need logits
//! go through the output layer (a fifth of the default model's weights).
//! A model loaded for a CUDA device (feature `cuda`) runs the same forward
//! on the GPU (`crate::cuda`) over device KV storage from [`Model::new_kv`].

use std::cell::OnceCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use crate::attention::{paged_attention, HeadShape};
use crate::batch::RaggedBatch;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::{KvLayout, KvStorage};
use crate::ops::{rms_norm_rows, silu_mul, RopeTable};
use crate::qgemm::{self, Q4Matrix, Q8Matrix, Q8Rows};

/// How linear-layer weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Requantize to 8-bit blocks at load (about 1 s) and multiply with our
    /// batched GEMM (`qgemm`), which reuses each weight block across the
    /// tokens of a batch. Any GGUF weight type loads this way.
    Q8_0,
    /// Our batched GEMM with 4-bit GGUF weights (Q4_0, Q4_1) kept at 4 bits
    /// (half the memory traffic per token, the file's exact values) and every
    /// other type at 8 bits. The default: fastest single-token decoding.
    #[default]
    Native,
    /// Requantize to Q8_0 and multiply with candle's quantized matmul (one
    /// dot product per token row): the comparison point for `q8_0`.
    CandleQ8_0,
    /// Keep the file's quantization.
    AsShipped,
    /// Dequantize to f32 (matmuls through candle's f32 GEMM).
    F32,
}

impl WeightFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Native => "native",
            Self::CandleQ8_0 => "candle-q8_0",
            Self::AsShipped => "as-shipped",
            Self::F32 => "f32",
        }
    }
}

impl FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "q8_0" => Ok(Self::Q8_0),
            "native" => Ok(Self::Native),
            "candle-q8_0" => Ok(Self::CandleQ8_0),
            "as-shipped" => Ok(Self::AsShipped),
            "f32" => Ok(Self::F32),
            other => Err(format!(
                "unknown weight format `{other}` (q8_0, native, candle-q8_0, as-shipped, f32)"
            )),
        }
    }
}

enum LinearWeight {
    Candle(QMatMul),
    Q8(Q8Matrix),
    Q4(Q4Matrix),
}

/// A matrix `(out, in)` applied to rows.
pub(crate) struct Linear {
    weight: LinearWeight,
    out_features: usize,
}

impl Linear {
    pub(crate) fn new(tensor: QTensor, format: WeightFormat) -> Result<Self> {
        let out_features = tensor.shape().dims()[0];
        let in_features = tensor.shape().dims()[1];
        if format == WeightFormat::Native {
            if let Some(w) = Q4Matrix::from_ggml(tensor.dtype(), &tensor.data()?, out_features, in_features) {
                return Ok(Linear {
                    weight: LinearWeight::Q4(w),
                    out_features,
                });
            }
        }
        let ours = matches!(format, WeightFormat::Q8_0 | WeightFormat::Native);
        if ours && in_features % qgemm::BLOCK == 0 {
            let w = tensor.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            return Ok(Linear {
                weight: LinearWeight::Q8(Q8Matrix::from_f32(&w, out_features, in_features)),
                out_features,
            });
        }
        let tensor = match format {
            WeightFormat::Q8_0 | WeightFormat::Native | WeightFormat::CandleQ8_0
                if tensor.dtype() != GgmlDType::Q8_0 && in_features % GgmlDType::Q8_0.block_size() == 0 =>
            {
                QTensor::quantize(&tensor.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
            }
            WeightFormat::F32 if tensor.dtype() != GgmlDType::F32 => {
                QTensor::quantize(&tensor.dequantize(&Device::Cpu)?, GgmlDType::F32)?
            }
            _ => tensor,
        };
        Ok(Linear {
            weight: LinearWeight::Candle(QMatMul::from_qtensor(tensor)?),
            out_features,
        })
    }

    /// `x (rows, in) -> (rows, out)`.
    pub(crate) fn apply(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.forward(&LinearInput::new(x, rows))
    }

    fn forward(&self, input: &LinearInput<'_>) -> Result<Vec<f32>> {
        let (x, rows) = (input.x, input.rows);
        match &self.weight {
            LinearWeight::Q8(w) => {
                let mut out = vec![0.0; rows * self.out_features];
                w.matmul_q8(input.quantized(), &mut out, qgemm::kernel_kind());
                Ok(out)
            }
            LinearWeight::Q4(w) => {
                let mut out = vec![0.0; rows * self.out_features];
                w.matmul_q8(input.quantized(), &mut out, qgemm::kernel_kind());
                Ok(out)
            }
            LinearWeight::Candle(w) => {
                let input = Tensor::from_slice(x, (rows, x.len() / rows), &Device::Cpu)?;
                let out = input.apply(w)?; // (rows, out_features)
                Ok(out.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

/// The input of one or more linear layers, `(rows, in)`: quantized to 8-bit
/// blocks at most once however many layers read it (q, k and v share one;
/// gate and up another).
struct LinearInput<'a> {
    x: &'a [f32],
    rows: usize,
    quantized: OnceCell<Q8Rows>,
}

impl<'a> LinearInput<'a> {
    fn new(x: &'a [f32], rows: usize) -> Self {
        LinearInput {
            x,
            rows,
            quantized: OnceCell::new(),
        }
    }

    fn quantized(&self) -> &Q8Rows {
        self.quantized.get_or_init(|| Q8Rows::quantize(self.x, self.rows))
    }
}

/// One decoder layer.
pub(crate) struct Layer {
    /// `None`: the layer reads its input unnormalised (an EAGLE head's
    /// first layer, whose input is already a projected feature).
    attn_norm: Option<Vec<f32>>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// Which target hidden states a draft head reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeatureTap {
    /// The final hidden state after the output norm (EAGLE, EAGLE-2).
    Final,
    /// The hidden states entering each listed layer, concatenated in order
    /// (EAGLE-3's low, middle and high layers); index `num_layers` is the
    /// last layer's output before the output norm.
    Layers(Vec<usize>),
}

impl FeatureTap {
    /// Floats per token.
    pub fn width(&self, hidden: usize) -> usize {
        match self {
            FeatureTap::Final => hidden,
            FeatureTap::Layers(l) => l.len() * hidden,
        }
    }

    /// EAGLE-3's default layers for a target of `num_layers`: 2, the
    /// middle one and the third from last (clamped for tiny models).
    pub fn eagle3_default(num_layers: usize) -> Self {
        let mut layers = vec![2.min(num_layers), num_layers / 2, num_layers.saturating_sub(3)];
        layers.sort_unstable();
        FeatureTap::Layers(layers)
    }
}

/// A loaded model, immutable after load: all mutable state lives in
/// [`KvStorage`].
pub struct Model {
    config: ModelConfig,
    /// (vocab, hidden)
    embeddings: Vec<f32>,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    lm_head: Linear,
    /// The forward's device copy, when loaded for a GPU.
    #[cfg(feature = "cuda")]
    gpu: Option<crate::cuda::DeviceModel>,
}

/// Tensors by GGUF name plus the hyperparameters.
pub struct ModelTensors {
    pub config: ModelConfig,
    pub tensors: HashMap<String, QTensor>,
}

impl ModelTensors {
    /// Reads a GGUF file; checks architecture and metadata, not yet tensors.
    pub fn read_gguf(path: &Path) -> Result<(Self, gguf_file::Content)> {
        if !path.exists() {
            return Err(EngineError::ModelNotFound {
                path: path.to_path_buf(),
            });
        }
        let file = File::open(path).map_err(|source| EngineError::ModelRead {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |e: candle_core::Error| EngineError::InvalidGguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(invalid)?;
        let config = ModelConfig::from_gguf(&content)?;
        let file_len = std::fs::metadata(path)
            .map_err(|source| EngineError::ModelRead {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let mut tensors = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let size = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + size as u64;
            if end > file_len {
                return Err(EngineError::InvalidGguf {
                    path: path.to_path_buf(),
                    reason: format!("file is truncated: tensor `{name}` ends at byte {end} of {file_len}"),
                });
            }
            let tensor = content.tensor(&mut reader, name, &Device::Cpu).map_err(invalid)?;
            tensors.insert(name.clone(), tensor);
        }
        Ok((ModelTensors { config, tensors }, content))
    }
}

impl Model {
    pub fn load(path: &Path, format: WeightFormat) -> Result<Self> {
        Self::load_on(path, format, crate::Device::Cpu)
    }

    /// [`Model::load`] whose forward runs on `device`.
    pub fn load_on(path: &Path, format: WeightFormat, device: crate::Device) -> Result<Self> {
        let (tensors, _) = ModelTensors::read_gguf(path)?;
        Self::from_tensors_on(tensors, format, device)
    }

    /// [`Model::from_tensors`] whose forward runs on `device`. On a GPU the
    /// CPU weights stay too (a draft head reads the embeddings).
    pub fn from_tensors_on(t: ModelTensors, format: WeightFormat, device: crate::Device) -> Result<Self> {
        match device {
            crate::Device::Cpu => Self::from_tensors(t, format),
            #[cfg(feature = "cuda")]
            crate::Device::Cuda(ordinal) => {
                t.config.validate()?;
                let gpu = crate::cuda::GpuModel::new(crate::cuda::Gpu::open(ordinal)?, &t)?;
                let mut model = Self::from_tensors(t, format)?;
                model.gpu = Some(crate::cuda::DeviceModel::Cuda(gpu));
                Ok(model)
            }
            #[cfg(not(feature = "cuda"))]
            crate::Device::Cuda(_) => Err(EngineError::Device(
                "this build has no GPU path: build with `--features cuda`".into(),
            )),
        }
    }

    /// Where the forward runs.
    pub fn device(&self) -> crate::Device {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.device();
        }
        crate::Device::Cpu
    }

    /// Empty KV storage for this model's forward: in device memory for a
    /// GPU model.
    pub fn new_kv(&self, layout: KvLayout) -> Result<KvStorage> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Ok(KvStorage::on_device(layout, g.new_kv(layout)?));
        }
        Ok(KvStorage::new(layout))
    }

    /// [`Model::from_tensors`] whose forward runs the GPU kernels under
    /// the tests' CPU emulation of CUDA.
    #[cfg(all(test, feature = "cuda"))]
    pub(crate) fn from_tensors_emulated(t: ModelTensors, format: WeightFormat) -> Result<Self> {
        let gpu = crate::cuda::GpuModel::new(std::sync::Arc::new(crate::cuda::Emulator), &t)?;
        let mut model = Self::from_tensors(t, format)?;
        model.gpu = Some(crate::cuda::DeviceModel::Emulated(gpu));
        Ok(model)
    }

    pub fn from_tensors(mut t: ModelTensors, format: WeightFormat) -> Result<Self> {
        let config = t.config.clone();
        config.validate()?;
        let h = config.hidden_size;
        let tied_output = !t.tensors.contains_key("output.weight");
        let mut take = |name: &str, shape: &[usize]| -> Result<QTensor> {
            let tensor = t.tensors.remove(name).ok_or_else(|| EngineError::BadTensor {
                name: name.to_string(),
                reason: "missing".into(),
            })?;
            if tensor.shape().dims() != shape {
                return Err(EngineError::BadTensor {
                    name: name.to_string(),
                    reason: format!("shape {:?}, expected {shape:?}", tensor.shape().dims()),
                });
            }
            Ok(tensor)
        };
        let vector = |q: QTensor| -> Result<Vec<f32>> { Ok(q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?) };

        let embd = take("token_embd.weight", &[config.vocab_size, h])?;
        let embeddings = embd.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            let (q, kv, ff) = (config.q_size(), config.kv_size(), config.intermediate_size);
            layers.push(Layer {
                attn_norm: Some(vector(take(&p("attn_norm"), &[h])?)?),
                wq: Linear::new(take(&p("attn_q"), &[q, h])?, format)?,
                wk: Linear::new(take(&p("attn_k"), &[kv, h])?, format)?,
                wv: Linear::new(take(&p("attn_v"), &[kv, h])?, format)?,
                wo: Linear::new(take(&p("attn_output"), &[h, q])?, format)?,
                ffn_norm: vector(take(&p("ffn_norm"), &[h])?)?,
                w_gate: Linear::new(take(&p("ffn_gate"), &[ff, h])?, format)?,
                w_up: Linear::new(take(&p("ffn_up"), &[ff, h])?, format)?,
                w_down: Linear::new(take(&p("ffn_down"), &[h, ff])?, format)?,
            });
        }
        let output_norm = vector(take("output_norm.weight", &[h])?)?;
        // Tied embeddings: without `output.weight` the embedding matrix is reused.
        let lm_head = if tied_output {
            embd
        } else {
            take("output.weight", &[config.vocab_size, h])?
        };
        Ok(Model {
            lm_head: Linear::new(lm_head, format)?,
            config,
            embeddings,
            layers,
            output_norm,
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs one ragged batch: writes the new tokens' K/V into `kv` at their
    /// slots and returns the logits rows asked for, `(rows, vocab)` flat, in
    /// batch order.
    pub fn forward(&self, batch: &RaggedBatch, kv: &mut KvStorage) -> Result<Vec<f32>> {
        Ok(self.forward_impl(batch, kv, self.layers.len(), None)?.0)
    }

    /// [`Model::forward`] that also returns every new token's features of
    /// `tap`, `(tokens, tap.width(hidden))` flat in batch order: what a
    /// draft head reads.
    pub fn forward_with_features(
        &self,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        tap: &FeatureTap,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if let FeatureTap::Layers(l) = tap {
            if let Some(&bad) = l.iter().find(|&&i| i > self.layers.len()) {
                return Err(EngineError::Config(format!(
                    "feature layer {bad}, the model has {} layers",
                    self.layers.len()
                )));
            }
        }
        self.forward_impl(batch, kv, self.layers.len(), Some(tap))
    }

    /// [`Model::forward`] through the first `num_layers` layers only, then
    /// the output norm and head (a layer-skip self-draft). Writes K/V of
    /// those layers only.
    pub fn forward_layers(&self, batch: &RaggedBatch, kv: &mut KvStorage, num_layers: usize) -> Result<Vec<f32>> {
        Ok(self.forward_impl(batch, kv, num_layers, None)?.0)
    }

    /// The embedding rows of `tokens`, `(tokens, hidden)` flat.
    pub fn embed(&self, tokens: impl IntoIterator<Item = u32>) -> Vec<f32> {
        let h = self.config.hidden_size;
        let mut x = Vec::new();
        for t in tokens {
            x.extend_from_slice(&self.embeddings[t as usize * h..(t as usize + 1) * h]);
        }
        x
    }

    /// The output layer on rows that are already normed, `(rows, vocab)`.
    pub fn logits_from_features(&self, features: &[f32]) -> Result<Vec<f32>> {
        let rows = features.len() / self.config.hidden_size;
        if rows == 0 {
            return Ok(Vec::new());
        }
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.logits_from_features(features);
        }
        self.lm_head.forward(&LinearInput::new(features, rows))
    }

    fn forward_impl(
        &self,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        num_layers: usize,
        tap: Option<&FeatureTap>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = &self.config;
        let layout = kv.layout();
        for seq in &batch.seqs {
            seq.validate(layout.block_size, layout.num_slots(), c.vocab_size)?;
        }
        let n = batch.num_tokens();
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let h = c.hidden_size;
        let mut x = self.embed(batch.seqs.iter().flat_map(|s| s.token_ids.iter().copied()));
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            let kv = kv.device_mut().ok_or_else(|| {
                EngineError::Config("a GPU model needs KV storage in device memory (Model::new_kv)".into())
            })?;
            let rows: Vec<usize> = batch.logits_token_rows().collect();
            return g.forward(&x, batch, kv, num_layers, tap, &rows);
        }
        if kv.is_on_device() {
            return Err(EngineError::Config(
                "a CPU model cannot use KV storage in device memory".into(),
            ));
        }
        let ctx = ForwardContext::new(batch, c, layout.block_size);
        // Layer taps: each token's states entering the listed layers.
        let taps: &[usize] = match tap {
            Some(FeatureTap::Layers(l)) => l,
            _ => &[],
        };
        let mut tapped = vec![0.0; if taps.is_empty() { 0 } else { n * taps.len() * h }];
        for (li, layer) in self.layers.iter().take(num_layers).enumerate() {
            copy_layer_taps(&mut tapped, taps, &x, li, h);
            layer.forward(&mut x, &ctx, batch, kv, li)?;
        }
        copy_layer_taps(&mut tapped, taps, &x, num_layers, h);

        let mut rows = Vec::with_capacity(batch.num_logits_rows() * h);
        let features = if tap == Some(&FeatureTap::Final) {
            let mut all = vec![0.0; n * h];
            rms_norm_rows(&x, &self.output_norm, c.rms_norm_eps, &mut all);
            for r in batch.logits_token_rows() {
                rows.extend_from_slice(&all[r * h..(r + 1) * h]);
            }
            all
        } else {
            let mut selected = Vec::with_capacity(rows.capacity());
            for r in batch.logits_token_rows() {
                selected.extend_from_slice(&x[r * h..(r + 1) * h]);
            }
            rows.resize(selected.len(), 0.0);
            rms_norm_rows(&selected, &self.output_norm, c.rms_norm_eps, &mut rows);
            tapped // empty without layer taps
        };
        debug_assert_eq!(self.lm_head.out_features, c.vocab_size);
        Ok((self.logits_from_features(&rows)?, features)) // (rows, vocab)
    }
}

/// Copies the states `x (tokens, hidden)` entering layer `at` into their
/// places in `tapped (tokens, taps, hidden)`, for each tap that names `at`.
pub(crate) fn copy_layer_taps(tapped: &mut [f32], taps: &[usize], x: &[f32], at: usize, h: usize) {
    for (j, _) in taps.iter().enumerate().filter(|(_, &l)| l == at) {
        for (t, row) in x.chunks_exact(h).enumerate() {
            let dst = (t * taps.len() + j) * h;
            tapped[dst..dst + h].copy_from_slice(row);
        }
    }
}

/// What every layer of one forward shares: token owners, KV slots, RoPE.
pub(crate) struct ForwardContext {
    n: usize,
    token_owner: Vec<(usize, usize)>,
    slots: Vec<usize>,
    rope: RopeTable,
    shape: HeadShape,
    eps: f32,
    /// Per-forward buffers every layer reuses: normed input `(tokens,
    /// hidden)` and attention output `(tokens, heads * head_dim)`.
    buffers: std::cell::RefCell<(Vec<f32>, Vec<f32>)>,
}

impl ForwardContext {
    pub(crate) fn new(batch: &RaggedBatch, c: &ModelConfig, block_size: usize) -> Self {
        ForwardContext {
            n: batch.num_tokens(),
            token_owner: batch.token_owners(),
            slots: batch.seqs.iter().flat_map(|s| s.slots.iter().copied()).collect(),
            rope: RopeTable::new(
                batch.seqs.iter().flat_map(|s| s.positions.iter().copied()),
                c.head_dim,
                c.rope_theta,
            ),
            shape: HeadShape {
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                block_size,
            },
            eps: c.rms_norm_eps,
            buffers: std::cell::RefCell::new((
                vec![0.0; batch.num_tokens() * c.hidden_size],
                vec![0.0; batch.num_tokens() * c.q_size()],
            )),
        }
    }
}

impl Layer {
    /// Weights `[q, k, v, o, gate, up, down]` (out, in) and norms.
    pub(crate) fn from_parts(
        attn_norm: Option<Vec<f32>>,
        ffn_norm: Vec<f32>,
        [wq, wk, wv, wo, w_gate, w_up, w_down]: [QTensor; 7],
        format: WeightFormat,
    ) -> Result<Self> {
        Ok(Layer {
            attn_norm,
            wq: Linear::new(wq, format)?,
            wk: Linear::new(wk, format)?,
            wv: Linear::new(wv, format)?,
            wo: Linear::new(wo, format)?,
            ffn_norm,
            w_gate: Linear::new(w_gate, format)?,
            w_up: Linear::new(w_up, format)?,
            w_down: Linear::new(w_down, format)?,
        })
    }

    /// Attention (writing this layer's K/V at the context's slots into
    /// `kv` layer `kv_layer`) and the gated MLP, both residual, on `x`
    /// `(tokens, hidden)`.
    pub(crate) fn forward(
        &self,
        x: &mut [f32],
        ctx: &ForwardContext,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        kv_layer: usize,
    ) -> Result<()> {
        self.forward_from(x, None, ctx, batch, kv, kv_layer)
    }

    /// [`Layer::forward`] whose attention projections read `attn_input`
    /// `(tokens, in)` instead of the (normed) residual stream: EAGLE-3's
    /// layer attends over `[embedding | feature]` of width `2 * hidden`.
    pub(crate) fn forward_from(
        &self,
        x: &mut [f32],
        attn_input: Option<&[f32]>,
        ctx: &ForwardContext,
        batch: &RaggedBatch,
        kv: &mut KvStorage,
        kv_layer: usize,
    ) -> Result<()> {
        let (n, shape) = (ctx.n, ctx.shape);
        let kvs = shape.num_kv_heads * shape.head_dim;
        let mut buffers = ctx.buffers.borrow_mut();
        let (normed, attn) = &mut *buffers;
        let input = match (attn_input, &self.attn_norm) {
            (Some(a), _) => LinearInput::new(a, n),
            (None, Some(w)) => {
                rms_norm_rows(x, w, ctx.eps, normed);
                LinearInput::new(normed, n)
            }
            (None, None) => LinearInput::new(x, n),
        };
        let mut q = self.wq.forward(&input)?; // (tokens, heads, head_dim)
        let mut k = self.wk.forward(&input)?; // (tokens, kv_heads, head_dim)
        let v = self.wv.forward(&input)?;
        drop(input);
        ctx.rope.apply(&mut q, shape.num_heads);
        ctx.rope.apply(&mut k, shape.num_kv_heads);
        for (t, &slot) in ctx.slots.iter().enumerate() {
            kv.write(kv_layer, slot, &k[t * kvs..(t + 1) * kvs], &v[t * kvs..(t + 1) * kvs]);
        }
        paged_attention(&q, batch, &ctx.token_owner, kv.layer(kv_layer), shape, attn);
        let o = self.wo.forward(&LinearInput::new(attn, n))?;
        add_into(x, &o);

        rms_norm_rows(x, &self.ffn_norm, ctx.eps, normed);
        let input = LinearInput::new(normed, n);
        let mut gate = self.w_gate.forward(&input)?; // (tokens, intermediate)
        let up = self.w_up.forward(&input)?;
        silu_mul(&mut gate, &up);
        let down = self.w_down.forward(&LinearInput::new(&gate, n))?;
        add_into(x, &down);
        Ok(())
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SeqRun;
    use crate::kv::KvLayout;
    use crate::testing::{tiny_config, tiny_model};
    use heterospec_kv::{BlockPool, BlockPoolConfig, BlockTable};

    /// Logits agree to this absolute tolerance: f32 sums in a different order.
    const TOL: f32 = 1e-4;

    fn storage(block_size: usize) -> (KvStorage, BlockPool) {
        let layout = KvLayout {
            num_blocks: 128,
            block_size,
            num_layers: tiny_config().num_layers,
            kv_size: tiny_config().kv_size(),
            scratch_slots: 0,
        };
        (
            KvStorage::new(layout),
            BlockPool::new(BlockPoolConfig {
                num_blocks: 128,
                block_size,
            }),
        )
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(worst < TOL, "{what}: max abs diff {worst}");
    }

    fn prompts() -> Vec<Vec<u32>> {
        vec![
            (0..23).map(|i| (i * 7 % 64) as u32).collect(),
            vec![5],
            (0..9).map(|i| (i * 3 + 1) as u32).collect(),
            (0..17).map(|i| (63 - i) as u32).collect(),
        ]
    }

    /// Every position's logits for one sequence run alone in one forward.
    fn solo_logits(model: &Model, tokens: &[u32], block_size: usize) -> Vec<f32> {
        let (mut kv, mut pool) = storage(block_size);
        let mut table = BlockTable::new();
        pool.allocate_slots(&mut table, tokens.len()).unwrap();
        let run = SeqRun::causal_from_table(tokens.to_vec(), 0, &table, block_size)
            .unwrap()
            .with_all_logits();
        model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap()
    }

    #[test]
    fn ragged_batch_equals_each_sequence_alone() {
        let model = tiny_model(1).unwrap();
        let vocab = model.config().vocab_size;
        for block_size in [4, 16] {
            let (mut kv, mut pool) = storage(block_size);
            let mut batch = RaggedBatch::default();
            for p in prompts() {
                let mut table = BlockTable::new();
                pool.allocate_slots(&mut table, p.len()).unwrap();
                batch.seqs.push(
                    SeqRun::causal_from_table(p, 0, &table, block_size)
                        .unwrap()
                        .with_all_logits(),
                );
            }
            let together = model.forward(&batch, &mut kv).unwrap();
            let mut offset = 0;
            for p in prompts() {
                let alone = solo_logits(&model, &p, block_size);
                assert_close(&together[offset..offset + alone.len()], &alone, "ragged vs alone");
                offset += p.len() * vocab;
            }
        }
    }

    #[test]
    fn incremental_decoding_equals_recomputing_the_whole_sequence() {
        let model = tiny_model(2).unwrap();
        let vocab = model.config().vocab_size;
        for block_size in [1, 3, 16] {
            for p in prompts() {
                let full = solo_logits(&model, &p, block_size);
                // chunks of 5 (chunked prefill), then one token at a time
                let (mut kv, mut pool) = storage(block_size);
                let mut table = BlockTable::new();
                let mut done = 0;
                while done < p.len() {
                    let n = if done < 10 { 5.min(p.len() - done) } else { 1 };
                    pool.allocate_slots(&mut table, done + n).unwrap();
                    let run = SeqRun::causal_from_table(p[done..done + n].to_vec(), done, &table, block_size)
                        .unwrap()
                        .with_all_logits();
                    let out = model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap();
                    assert_close(&out, &full[done * vocab..(done + n) * vocab], "incremental vs full");
                    done += n;
                }
            }
        }
    }

    #[test]
    fn tree_node_logits_equal_decoding_its_path() {
        let model = tiny_model(3).unwrap();
        let vocab = model.config().vocab_size;
        let bs = 4;
        let prefix: Vec<u32> = vec![1, 2, 3, 4, 5, 6];
        // tree: n0=10; n1=11 (child of n0); n2=12 (child of n0); n3=13 (child of n1)
        let parents = [None, Some(0), Some(0), Some(1)];
        let tokens = [10u32, 11, 12, 13];
        let (mut kv, mut pool) = storage(bs);
        let mut table = BlockTable::new();
        pool.allocate_slots(&mut table, prefix.len() + tokens.len()).unwrap();
        let run = SeqRun::causal_from_table(prefix.clone(), 0, &table, bs).unwrap();
        model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap();
        let depth = |mut i: usize| {
            let mut d = 0;
            while let Some(p) = parents[i] {
                i = p;
                d += 1;
            }
            d
        };
        let mut run = SeqRun::causal_from_table(tokens.to_vec(), prefix.len(), &table, bs)
            .unwrap()
            .with_all_logits();
        run.positions = (0..4).map(|i| prefix.len() + depth(i)).collect();
        let mut mask = vec![false; 16];
        for i in 0..4 {
            let mut a = Some(i);
            while let Some(j) = a {
                mask[i * 4 + j] = true;
                a = parents[j];
            }
        }
        run.mask = Some(mask);
        let tree = model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap();
        for node in 0..4 {
            let mut path = vec![node];
            while let Some(p) = parents[*path.last().unwrap()] {
                path.push(p);
            }
            let mut seq = prefix.clone();
            seq.extend(path.iter().rev().map(|&i| tokens[i]));
            let want = solo_logits(&model, &seq, bs);
            let last = seq.len() - 1;
            assert_close(
                &tree[node * vocab..(node + 1) * vocab],
                &want[last * vocab..(last + 1) * vocab],
                "tree node",
            );
        }
    }

    #[test]
    fn bad_runs_are_errors_not_panics() {
        let model = tiny_model(4).unwrap();
        let (mut kv, _) = storage(4);
        let mut run = SeqRun::causal(vec![1, 2], 0, &[heterospec_kv::BlockId(1)], 4).unwrap();
        run.token_ids[1] = 10_000;
        assert!(model
            .forward(&RaggedBatch { seqs: vec![run] }, &mut kv)
            .unwrap_err()
            .to_string()
            .contains("vocabulary"));
        assert!(
            SeqRun::causal(vec![1; 5], 0, &[heterospec_kv::BlockId(1)], 4).is_err(),
            "table too short"
        );
    }
}

#[cfg(test)]
mod weight_type_tests {
    use super::*;
    use crate::batch::SeqRun;
    use crate::kv::KvLayout;
    use crate::testing::random_tensors;
    use heterospec_kv::BlockId;

    /// Shapes that every GGUF block size divides (K-quants need 256).
    fn config() -> ModelConfig {
        ModelConfig {
            num_layers: 1,
            hidden_size: 256,
            intermediate_size: 512,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            vocab_size: 64,
            max_context: 64,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
        }
    }

    /// Logits of 5 tokens with every linear weight stored as `dtype`.
    fn logits(dtype: Option<GgmlDType>, format: WeightFormat) -> Vec<f32> {
        let mut t = random_tensors(&config(), 7).unwrap();
        for (name, q) in t.tensors.iter_mut() {
            if q.shape().rank() == 2 && !name.starts_with("token_embd") {
                let f = q.dequantize(&Device::Cpu).unwrap();
                *q = match dtype {
                    Some(d) => QTensor::quantize(&f, d).unwrap(),
                    None => QTensor::quantize(&f, GgmlDType::F32).unwrap(),
                };
            }
        }
        let model = Model::from_tensors(t, format).unwrap();
        let layout = KvLayout::for_budget(model.config(), 16, 1 << 20).unwrap();
        let mut kv = KvStorage::new(layout);
        let run = SeqRun::causal(vec![1, 5, 9, 3, 7], 0, &[BlockId(1)], 16)
            .unwrap()
            .with_all_logits();
        model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap()
    }

    /// Each GGUF weight type loads in every format and gives the logits of
    /// its own dequantized f32 weights, up to 8-bit activation rounding.
    #[test]
    fn every_weight_type_matches_its_dequantized_f32_model() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::F16,
        ] {
            // The reference: the same quantized values, dequantized, in f32.
            let mut t = random_tensors(&config(), 7).unwrap();
            for (name, q) in t.tensors.iter_mut() {
                if q.shape().rank() == 2 && !name.starts_with("token_embd") {
                    let f = q.dequantize(&Device::Cpu).unwrap();
                    let quantized = QTensor::quantize(&f, dtype).unwrap();
                    *q = QTensor::quantize(&quantized.dequantize(&Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
                }
            }
            let model = Model::from_tensors(t, WeightFormat::F32).unwrap();
            let layout = KvLayout::for_budget(model.config(), 16, 1 << 20).unwrap();
            let mut kv = KvStorage::new(layout);
            let run = SeqRun::causal(vec![1, 5, 9, 3, 7], 0, &[BlockId(1)], 16)
                .unwrap()
                .with_all_logits();
            let want = model.forward(&RaggedBatch { seqs: vec![run] }, &mut kv).unwrap();
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for format in [WeightFormat::Native, WeightFormat::Q8_0, WeightFormat::AsShipped] {
                let got = logits(Some(dtype), format);
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                println!("{dtype:?} as {format:?}: worst |diff| {worst:.5} of max |logit| {scale:.3}");
                // 8-bit activation rounding (and q8_0's second rounding of the
                // weights) moves logits by ~0.15% of their range here.
                assert!(
                    worst < 0.005 * scale,
                    "{dtype:?} as {format:?}: worst {worst} of {scale}"
                );
            }
        }
        assert!(!logits(None, WeightFormat::Native).is_empty());
    }
}
