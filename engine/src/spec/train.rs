//! Training a draft head on the target's own features, with candle's
//! autograd on the CPU.
//!
//! Each training sequence is a prompt and the target's greedy answer, with
//! the target's states of the head's tap at every position.
//!
//! EAGLE: row `q` of the head reads `embed(token_q)` and the final
//! `feature_{q-1}` (plus uniform noise, as EAGLE does, so it tolerates its
//! own guesses when drafting deeper) and is trained to output `feature_q`
//! (smooth L1) and to rank `token_{q+1}` first over the sub-vocabulary
//! (cross-entropy), on the answer's positions.
//!
//! EAGLE-3: cross-entropy only, with training-time test: step 0 reads the
//! fused target states; step `j` feeds row `q` the head's own step-`j-1`
//! output of row `q - 1`, and row `q` attends to step-0 rows up to `q - j`
//! and to its own diagonal of steps `1..=j` — exactly what a depth-`j` draft
//! node sees when drafting. Step `j`'s loss is weighted `0.8^j`.
//!
//! The graphs here are the same computation as
//! [`DraftHead::forward`](super::head::DraftHead::forward), in Hugging
//! Face's RoPE order (tests check they agree, for every TTT step).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::batch::{RaggedBatch, SeqRun};
use crate::error::{EngineError, Result};
use crate::kv::KvLayout;
use crate::model::{FeatureTap, Model};
use crate::spec::head::{
    EagleConfig, HeadConfig, HeadKind, HeadWeights, D2T, EAGLE3_HIDDEN_NORM, EAGLE3_INPUT_NORM, FC, FC_BIAS, LM_HEAD,
    OUTPUT_NORM,
};

/// A prompt and the target's answer, with the target's features.
#[derive(Debug, Clone)]
pub struct TrainSequence {
    pub tokens: Vec<u32>,
    /// `(tokens, tap width)`: the target's states of the head's tap at
    /// each position.
    pub features: Vec<f32>,
    /// First position of the answer: rows predicting tokens from here on
    /// carry the loss.
    pub answer_start: usize,
}

/// The target's states of `tap` at every position of `tokens`.
pub fn target_features(model: &Model, tokens: &[u32], chunk: usize, tap: &FeatureTap) -> Result<Vec<f32>> {
    let c = model.config();
    let block_size = 16;
    let layout = KvLayout {
        num_blocks: tokens.len().div_ceil(block_size).max(1),
        block_size,
        num_layers: c.num_layers,
        kv_size: c.kv_size(),
        scratch_slots: 0,
    };
    let mut kv = model.new_kv(layout)?;
    let table: Vec<_> = (0..layout.num_blocks as u32).map(heterospec_kv::BlockId).collect();
    let mut out = Vec::with_capacity(tokens.len() * tap.width(c.hidden_size));
    for start in (0..tokens.len()).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(tokens.len());
        let run = SeqRun::causal(tokens[start..end].to_vec(), start, &table, block_size)?;
        let (_, features) = model.forward_with_features(&RaggedBatch { seqs: vec![run] }, &mut kv, tap)?;
        out.extend(features);
    }
    Ok(out)
}

/// The `size` most frequent answer tokens (ties by id), then the lowest
/// unused ids up to `size` (BPE numbers its merges roughly by frequency, and
/// the output rows start as the target's, so unseen tokens still rank
/// sensibly); and the share of answer tokens covered.
pub fn frequent_tokens(data: &[TrainSequence], size: usize, vocab_size: usize) -> (Vec<u32>, f64) {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    let mut total = 0;
    for s in data {
        for &t in &s.tokens[s.answer_start.max(1)..] {
            *counts.entry(t).or_default() += 1;
            total += 1;
        }
    }
    let mut ranked: Vec<(u32, usize)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let size = size.min(vocab_size);
    ranked.truncate(size);
    let covered: usize = ranked.iter().map(|r| r.1).sum();
    let mut ids: Vec<u32> = ranked.iter().map(|r| r.0).collect();
    let mut taken: std::collections::HashSet<u32> = ids.iter().copied().collect();
    let mut next = 0u32;
    while ids.len() < size {
        if taken.insert(next) {
            ids.push(next);
        }
        next += 1;
    }
    (ids, covered as f64 / total.max(1) as f64)
}

/// Training settings.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub sub_vocab: usize,
    /// Longest sequence trained on (longer ones are cut).
    pub max_len: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    pub epochs: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// Weight of the cross-entropy term (the feature term has weight 1).
    pub cls_weight: f64,
    /// Uniform noise on input features, as a fraction of their RMS (EAGLE).
    pub noise: f32,
    /// Training-time-test steps (EAGLE-3).
    pub ttt_steps: usize,
    /// Share of sequences trained without their prompt's states (EAGLE-3).
    pub prompt_dropout: f32,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            sub_vocab: 4096,
            max_len: 384,
            batch_size: 8,
            epochs: 4,
            learning_rate: 1e-3,
            warmup_steps: 30,
            cls_weight: 0.1,
            noise: 0.2,
            ttt_steps: 3,
            prompt_dropout: 0.1,
            seed: 0,
        }
    }
}

/// Trainable tensors by checkpoint name.
pub struct HeadParams {
    pub config: HeadConfig,
    pub kind: HeadKind,
    /// The target states the head reads.
    pub tap: FeatureTap,
    pub vars: Vec<(String, Var)>,
    pub d2t: Tensor,
    pub sub_vocab: Vec<u32>,
}

impl HeadParams {
    /// A new head of `kind` for `target`: random matrices (seeded), unit
    /// norms, the output layer initialised from the target's embedding rows
    /// of the sub-vocabulary (its output layer when tied, as for the default
    /// model). It reads `kind.default_tap`.
    pub fn init(target: &Model, sub_vocab: Vec<u32>, seed: u64, dtype: DType, kind: HeadKind) -> Result<Self> {
        let c = target.config();
        let tap = kind.default_tap(c.num_layers);
        let config = HeadConfig {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_heads,
            num_key_value_heads: c.num_kv_heads,
            head_dim: Some(c.head_dim),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            vocab_size: c.vocab_size,
            draft_vocab_size: Some(sub_vocab.len()),
            provenance: String::new(),
            eagle_config: match &tap {
                FeatureTap::Layers(l) => Some(EagleConfig {
                    eagle_aux_hidden_state_layer_ids: Some(l.clone()),
                }),
                FeatureTap::Final => None,
            },
            eagle_aux_hidden_state_layer_ids: None,
            norm_before_residual: false,
            norm_before_fc: false,
            architectures: match kind {
                HeadKind::Eagle => vec![],
                HeadKind::Eagle3 => vec!["LlamaForCausalLMEagle3".into()],
            },
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let (h, q, kv, ff) = (c.hidden_size, c.q_size(), c.kv_size(), c.intermediate_size);
        let mut random = |shape: (usize, usize)| -> Result<Var> {
            let std = 1.0 / (shape.1 as f32).sqrt();
            let data: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std * 3f32.sqrt())
                .collect();
            Ok(Var::from_tensor(
                &Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?,
            )?)
        };
        let (fc_in, attn_in) = match kind {
            HeadKind::Eagle => (2 * h, h),
            HeadKind::Eagle3 => (tap.width(h), 2 * h),
        };
        let mut vars = vec![(FC.to_string(), random((h, fc_in))?)];
        for (name, shape) in kind.layer_matrices().iter().zip([
            (q, attn_in),
            (kv, attn_in),
            (kv, attn_in),
            (h, q),
            (ff, h),
            (ff, h),
            (h, ff),
        ]) {
            vars.push((name.to_string(), random(shape)?));
        }
        let ones = || Var::ones(h, dtype, &Device::Cpu);
        match kind {
            HeadKind::Eagle => vars.push((FC_BIAS.to_string(), Var::zeros(h, dtype, &Device::Cpu)?)),
            HeadKind::Eagle3 => {
                for name in [EAGLE3_INPUT_NORM, EAGLE3_HIDDEN_NORM, OUTPUT_NORM] {
                    vars.push((name.to_string(), ones()?));
                }
            }
        }
        vars.push((kind.post_norm().to_string(), ones()?));
        let rows = target.embed(sub_vocab.iter().copied());
        let lm = Tensor::from_vec(rows, (sub_vocab.len(), h), &Device::Cpu)?.to_dtype(dtype)?;
        vars.push((LM_HEAD.to_string(), Var::from_tensor(&lm)?));
        Ok(HeadParams {
            config,
            kind,
            tap,
            vars,
            d2t: HeadWeights::d2t_tensor(&sub_vocab)?,
            sub_vocab,
        })
    }

    fn get(&self, name: &str) -> &Tensor {
        self.vars
            .iter()
            .find(|v| v.0 == name)
            .map(|v| v.1.as_tensor())
            .expect("every head tensor is a parameter")
    }

    /// The checkpoint of the current values (f32).
    pub fn weights(&self) -> Result<HeadWeights> {
        let mut tensors = HashMap::new();
        for (name, var) in &self.vars {
            tensors.insert(name.clone(), var.as_tensor().to_dtype(DType::F32)?);
        }
        tensors.insert(D2T.to_string(), self.d2t.clone());
        Ok(HeadWeights {
            config: self.config.clone(),
            tensors,
        })
    }
}

/// One padded batch: inputs and targets as tensors.
pub struct Batch {
    /// `(b, t, h)` target embeddings of each row's token.
    pub embeds: Tensor,
    /// `(b, t, tap width)` input features (those of the previous position).
    pub features_in: Tensor,
    /// `(b*t, h)` the feature each row should output (EAGLE).
    pub features_out: Option<Tensor>,
    /// `(b*t,)` sub-vocabulary index of the next token (0 where masked).
    pub next: Tensor,
    /// `(b*t,)` 1 where the feature term counts.
    pub feature_mask: Tensor,
    /// `(b*t,)` 1 where the cross-entropy term counts (next token in the
    /// sub-vocabulary).
    pub token_mask: Tensor,
    /// `(b, 1, t, head_dim)` RoPE tables, Hugging Face order.
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Builds a batch of `seqs` (cut to `max_len`), with input-feature noise
/// of amplitude `noise_amp` drawn from `rng`; with probability
/// `prompt_dropout` a sequence's prompt states are left out (zeros), as when
/// the head drafts in the same step that computes the prompt.
pub fn make_batch(
    target: &Model,
    params: &HeadParams,
    seqs: &[&TrainSequence],
    sub_index: &HashMap<u32, u32>,
    max_len: usize,
    noise_amp: f32,
    prompt_dropout: f32,
    rng: &mut StdRng,
    dtype: DType,
) -> Result<Batch> {
    let head = &params.config;
    let h = head.hidden_size;
    let fw = params.tap.width(h);
    let with_out = params.kind == HeadKind::Eagle;
    let t_len = seqs.iter().map(|s| s.tokens.len().min(max_len)).max().unwrap_or(0);
    let b = seqs.len();
    let (mut emb, mut fin, mut fout) = (
        vec![0f32; b * t_len * h],
        vec![0f32; b * t_len * fw],
        vec![0f32; if with_out { b * t_len * h } else { 0 }],
    );
    let (mut next, mut fmask, mut tmask) = (vec![0u32; b * t_len], vec![0f32; b * t_len], vec![0f32; b * t_len]);
    for (i, s) in seqs.iter().enumerate() {
        let len = s.tokens.len().min(max_len);
        let e = target.embed(s.tokens[..len].iter().copied());
        let base = i * t_len;
        emb[base * h..(base + len) * h].copy_from_slice(&e);
        let blind = prompt_dropout > 0.0 && rng.random::<f32>() < prompt_dropout;
        for q in 0..len {
            let row = base + q;
            if q > 0 && !(blind && q < s.answer_start) {
                for (d, &f) in fin[row * fw..(row + 1) * fw]
                    .iter_mut()
                    .zip(&s.features[(q - 1) * fw..q * fw])
                {
                    *d = f + if noise_amp > 0.0 {
                        (rng.random::<f32>() * 2.0 - 1.0) * noise_amp
                    } else {
                        0.0
                    };
                }
            }
            if with_out {
                fout[row * h..(row + 1) * h].copy_from_slice(&s.features[q * h..(q + 1) * h]);
            }
            if q + 1 >= s.answer_start.max(1) {
                fmask[row] = 1.0;
                if q + 1 < len {
                    if let Some(&k) = sub_index.get(&s.tokens[q + 1]) {
                        next[row] = k;
                        tmask[row] = 1.0;
                    }
                }
            }
        }
    }
    let dev = Device::Cpu;
    let (cos, sin) = hf_rope_tables(head, seqs.len(), t_len)?;
    let f = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> { Ok(Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?) };
    Ok(Batch {
        embeds: f(emb, &[b, t_len, h])?,
        features_in: f(fin, &[b, t_len, fw])?,
        features_out: if with_out {
            Some(f(fout, &[b * t_len, h])?)
        } else {
            None
        },
        next: Tensor::from_vec(next, b * t_len, &dev)?,
        feature_mask: f(fmask, &[b * t_len])?,
        token_mask: f(tmask, &[b * t_len])?,
        cos: cos.to_dtype(dtype)?,
        sin: sin.to_dtype(dtype)?,
    })
}

/// `(b, 1, t, head_dim)` cos and sin for positions `0..t`, each frequency
/// repeated over both halves (Hugging Face's `rotate_half` order).
fn hf_rope_tables(head: &HeadConfig, b: usize, t: usize) -> Result<(Tensor, Tensor)> {
    let hd = head.head_dim();
    let half = hd / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(t * hd), Vec::with_capacity(t * hd));
    for p in 0..t {
        for i in 0..hd {
            let f = 1.0 / (head.rope_theta as f64).powf(2.0 * (i % half) as f64 / hd as f64);
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let dev = Device::Cpu;
    let cos = Tensor::from_vec(cos, (1, 1, t, hd), &dev)?
        .broadcast_as((b, 1, t, hd))?
        .contiguous()?;
    let sin = Tensor::from_vec(sin, (1, 1, t, hd), &dev)?
        .broadcast_as((b, 1, t, hd))?
        .contiguous()?;
    Ok((cos, sin))
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// Shapes and tables shared by the pieces of one batch's graph.
struct Graph<'a> {
    p: &'a HeadParams,
    batch: &'a Batch,
    b: usize,
    t: usize,
}

impl Graph<'_> {
    fn lin(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        Ok(x.matmul(&self.p.get(name).t()?)?)
    }

    /// `(b*t, n*hd)` -> `(b, n, t, hd)`.
    fn heads(&self, y: Tensor, n: usize) -> Result<Tensor> {
        let hd = self.p.config.head_dim();
        Ok(y.reshape((self.b, self.t, n, hd))?.transpose(1, 2)?.contiguous()?)
    }

    fn rope(&self, y: &Tensor) -> Result<Tensor> {
        let cos = self.batch.cos.broadcast_as(y.shape())?;
        let sin = self.batch.sin.broadcast_as(y.shape())?;
        Ok((y.mul(&cos)? + rotate_half(y)?.mul(&sin)?)?)
    }

    /// RoPE'd queries and (repeated to every query head) keys and values of
    /// `input` `(b*t, in)`, each `(b, heads, t, hd)`.
    fn qkv(&self, input: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.p.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let m = self.p.kind.layer_matrices();
        let q = self.rope(&self.heads(self.lin(input, m[0])?, nh)?)?;
        let k = self.rope(&self.heads(self.lin(input, m[1])?, nkv)?)?;
        let v = self.heads(self.lin(input, m[2])?, nkv)?;
        let (b, t) = (self.b, self.t);
        let repeat = |y: Tensor| -> Result<Tensor> {
            Ok(y.unsqueeze(2)?
                .broadcast_as((b, nkv, nh / nkv, t, hd))?
                .reshape((b, nh, t, hd))?)
        };
        Ok((q, repeat(k)?, repeat(v)?))
    }

    /// `(t, t)` additive mask: key `k` visible to query `q` when `k + lag <= q`.
    fn causal_mask(&self, lag: usize, dtype: DType) -> Result<Tensor> {
        let t = self.t;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| if i % t + lag > i / t { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        Ok(Tensor::from_vec(mask, (t, t), &Device::Cpu)?.to_dtype(dtype)?)
    }

    /// Attention output `(b, heads, t, hd)` -> the residual update `(b*t, h)`,
    /// then the gated MLP: the layer's output stream.
    fn finish_layer(&self, x: &Tensor, attn: Tensor) -> Result<Tensor> {
        let c = &self.p.config;
        let m = self.p.kind.layer_matrices();
        let attn = attn
            .transpose(1, 2)?
            .reshape((self.b * self.t, c.num_attention_heads * c.head_dim()))?;
        let x = (x + self.lin(&attn, m[3])?)?;
        let normed = rms_norm(&x, self.p.get(self.p.kind.post_norm()), c.rms_norm_eps as f64)?;
        let gate = self.lin(&normed, m[4])?.silu()?;
        let up = self.lin(&normed, m[5])?;
        Ok((&x + self.lin(&(gate * up)?, m[6])?)?)
    }
}

/// `y` moved `by` rows later along dimension `dim` (zeros enter first).
fn shift(y: &Tensor, dim: usize, by: usize) -> Result<Tensor> {
    if by == 0 {
        return Ok(y.clone());
    }
    let len = y.dim(dim)?;
    let zeros = y.narrow(dim, 0, by.min(len))?.zeros_like()?;
    if by >= len {
        return Ok(zeros);
    }
    Ok(Tensor::cat(&[&zeros, &y.narrow(dim, 0, len - by)?], dim)?)
}

/// The head on a batch, per training-time-test step (one step for EAGLE):
/// `(b*t, h)` output stream and `(b*t, draft_vocab)` logits.
pub fn forward(p: &HeadParams, batch: &Batch, steps: usize) -> Result<Vec<(Tensor, Tensor)>> {
    let c = &p.config;
    let (b, t, h) = batch.embeds.dims3()?;
    let g = Graph { p, batch, b, t };
    let scale = (c.head_dim() as f64).sqrt();
    let fw = batch.features_in.dim(2)?;
    let dtype = batch.embeds.dtype();
    match p.kind {
        HeadKind::Eagle => {
            let input = Tensor::cat(&[&batch.embeds, &batch.features_in], 2)?.reshape((b * t, 2 * h))?;
            let x = g.lin(&input, FC)?.broadcast_add(p.get(FC_BIAS))?;
            let (q, k, v) = g.qkv(&x)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? / scale)?.broadcast_add(&g.causal_mask(0, dtype)?)?;
            let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let x = g.finish_layer(&x, weights.matmul(&v.contiguous()?)?)?;
            let logits = g.lin(&x, LM_HEAD)?;
            Ok(vec![(x, logits)])
        }
        HeadKind::Eagle3 => {
            let eps = c.rms_norm_eps as f64;
            let embeds = rms_norm(&batch.embeds.reshape((b * t, h))?, p.get(EAGLE3_INPUT_NORM), eps)?;
            let mut x_in = g.lin(&batch.features_in.reshape((b * t, fw))?, FC)?;
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            let mut out = Vec::new();
            for j in 0..steps.max(1) {
                let input = Tensor::cat(&[&embeds, &rms_norm(&x_in, p.get(EAGLE3_HIDDEN_NORM), eps)?], 1)?;
                let (q, k, v) = g.qkv(&input)?;
                keys.push(k);
                values.push(v);
                // Step-0 rows up to q - j, then the diagonal of steps 1..=j:
                // step i's row q - (j - i).
                let mut scores =
                    vec![(q.matmul(&keys[0].t()?.contiguous()?)? / scale)?.broadcast_add(&g.causal_mask(j, dtype)?)?];
                let mut shifted_values = Vec::new();
                for i in 1..=j {
                    let k_i = shift(&keys[i], 2, j - i)?;
                    scores.push(((&q * &k_i)?.sum_keepdim(D::Minus1)? / scale)?);
                    shifted_values.push(shift(&values[i], 2, j - i)?);
                }
                let weights = candle_nn::ops::softmax(&Tensor::cat(&scores, D::Minus1)?, D::Minus1)?;
                let mut attn = weights.narrow(D::Minus1, 0, t)?.matmul(&values[0].contiguous()?)?;
                for (i, v_i) in shifted_values.iter().enumerate() {
                    attn = (attn + weights.narrow(D::Minus1, t + i, 1)?.broadcast_mul(v_i)?)?;
                }
                let x = g.finish_layer(&x_in, attn)?;
                let logits = g.lin(&rms_norm(&x, p.get(OUTPUT_NORM), eps)?, LM_HEAD)?;
                // Next step: row q reads this step's output of row q - 1.
                x_in = shift(&x.reshape((b, t, h))?, 1, 1)?.reshape((b * t, h))?;
                out.push((x, logits));
            }
            Ok(out)
        }
    }
}

/// A one-element tensor's value.
fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Loss terms of a batch: `(total, feature term, cross-entropy, top-1
/// accuracy on counted rows)`; for EAGLE-3 the cross-entropy and top-1 are
/// those of step 0 and the total is the `0.8^j`-weighted mean over steps.
pub fn loss(p: &HeadParams, batch: &Batch, cls_weight: f64, steps: usize) -> Result<(Tensor, f64, f64, f64)> {
    let outs = forward(p, batch, steps)?;
    let (_, t, _) = batch.embeds.dims3()?;
    let dtype = batch.token_mask.dtype();
    let cross_entropy = |logits: &Tensor, mask: &Tensor| -> Result<(Tensor, f64)> {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let picked = logp.gather(&batch.next.unsqueeze(1)?, 1)?.squeeze(1)?;
        let tsum = scalar(&mask.sum_all()?)?.max(1.0);
        let ce = ((picked * mask)?.sum_all()?.neg()? / tsum)?;
        let top1 = logits.argmax(D::Minus1)?.eq(&batch.next)?.to_dtype(dtype)?;
        Ok((ce, scalar(&(top1 * mask)?.sum_all()?)? / tsum))
    };
    let (ce0, acc) = cross_entropy(&outs[0].1, &batch.token_mask)?;
    match &batch.features_out {
        Some(features_out) => {
            let diff = (&outs[0].0 - features_out)?.abs()?;
            let small = diff.minimum(1.0)?;
            let smooth = ((small.sqr()? * 0.5)? + (diff - small)?)?.mean(D::Minus1)?;
            let fsum = scalar(&batch.feature_mask.sum_all()?)?.max(1.0);
            let reg = ((smooth * &batch.feature_mask)?.sum_all()? / fsum)?;
            let total = (&reg + (&ce0 * cls_weight)?)?;
            Ok((total, scalar(&reg)?, scalar(&ce0)?, acc))
        }
        None => {
            let rows = batch.token_mask.dim(0)?;
            let mut total = ce0.clone();
            let mut weight_sum = 1.0;
            for (j, (_, logits)) in outs.iter().enumerate().skip(1) {
                // Rows q >= j have a step-j input.
                let from_j: Vec<f32> = (0..rows).map(|r| if r % t >= j { 1.0 } else { 0.0 }).collect();
                let mask = (Tensor::from_vec(from_j, rows, &Device::Cpu)?.to_dtype(dtype)? * &batch.token_mask)?;
                let w = 0.8f64.powi(j as i32);
                total = (total + (cross_entropy(logits, &mask)?.0 * w)?)?;
                weight_sum += w;
            }
            let total = (total / weight_sum)?;
            Ok((total, 0.0, scalar(&ce0)?, acc))
        }
    }
}

/// Per-epoch means of the loss terms.
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochStats {
    pub loss: f64,
    pub feature_loss: f64,
    pub token_loss: f64,
    pub top1: f64,
}

/// RMS of all features (the scale the input noise is relative to).
pub fn feature_rms(data: &[TrainSequence]) -> f32 {
    let (mut sum, mut n) = (0f64, 0usize);
    for s in data {
        sum += s.features.iter().map(|&f| (f as f64) * (f as f64)).sum::<f64>();
        n += s.features.len();
    }
    (sum / n.max(1) as f64).sqrt() as f32
}

/// Trains `params` on `data`; `progress(step, steps, stats of the step)`
/// after each optimizer step. Returns per-epoch means.
pub fn train(
    target: &Model,
    params: &mut HeadParams,
    data: &[TrainSequence],
    cfg: &TrainConfig,
    mut progress: impl FnMut(usize, usize, &EpochStats),
) -> Result<Vec<EpochStats>> {
    if data.is_empty() {
        return Err(EngineError::Config("no training sequences".into()));
    }
    let dtype = params.vars[0].1.dtype();
    let sub_index: HashMap<u32, u32> = params
        .sub_vocab
        .iter()
        .enumerate()
        .map(|(i, &t)| (t, i as u32))
        .collect();
    let (noise_amp, prompt_dropout) = match params.kind {
        HeadKind::Eagle => (cfg.noise * feature_rms(data), 0.0),
        HeadKind::Eagle3 => (0.0, cfg.prompt_dropout), // training-time test instead of noise
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5EED);
    // Batches of similar lengths (little padding), visited in a new random
    // order each epoch.
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| (data[i].tokens.len(), i));
    let batches: Vec<Vec<usize>> = order.chunks(cfg.batch_size.max(1)).map(|c| c.to_vec()).collect();
    let steps = batches.len() * cfg.epochs;
    let mut opt = AdamW::new(
        params.vars.iter().map(|v| v.1.clone()).collect(),
        ParamsAdamW {
            lr: cfg.learning_rate,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let mut epochs = Vec::new();
    let mut step = 0;
    for _ in 0..cfg.epochs {
        let mut visit: Vec<usize> = (0..batches.len()).collect();
        visit.shuffle(&mut rng);
        let mut sum = EpochStats::default();
        for &bi in &visit {
            let lr = if step < cfg.warmup_steps {
                cfg.learning_rate * (step + 1) as f64 / cfg.warmup_steps as f64
            } else {
                let done = (step - cfg.warmup_steps) as f64 / (steps - cfg.warmup_steps).max(1) as f64;
                cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * done).cos()))
            };
            opt.set_learning_rate(lr);
            let seqs: Vec<&TrainSequence> = batches[bi].iter().map(|&i| &data[i]).collect();
            let batch = make_batch(
                target,
                params,
                &seqs,
                &sub_index,
                cfg.max_len,
                noise_amp,
                prompt_dropout,
                &mut rng,
                dtype,
            )?;
            let (total, reg, ce, acc) = loss(params, &batch, cfg.cls_weight, cfg.ttt_steps)?;
            opt.backward_step(&total)?;
            let stats = EpochStats {
                loss: scalar(&total)?,
                feature_loss: reg,
                token_loss: ce,
                top1: acc,
            };
            sum.loss += stats.loss;
            sum.feature_loss += reg;
            sum.token_loss += ce;
            sum.top1 += acc;
            step += 1;
            progress(step, steps, &stats);
        }
        let n = batches.len() as f64;
        epochs.push(EpochStats {
            loss: sum.loss / n,
            feature_loss: sum.feature_loss / n,
            token_loss: sum.token_loss / n,
            top1: sum.top1 / n,
        });
    }
    Ok(epochs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvStorage;
    use crate::model::WeightFormat;
    use crate::spec::head::DraftHead;
    use crate::testing::{tiny_model, tiny_training_data};

    const KINDS: [HeadKind; 2] = [HeadKind::Eagle, HeadKind::Eagle3];

    fn no_noise_batch(target: &Model, p: &HeadParams, data: &[TrainSequence], dtype: DType) -> Batch {
        let sub_index = p.sub_vocab.iter().enumerate().map(|(i, &t)| (t, i as u32)).collect();
        let seqs: Vec<&TrainSequence> = data.iter().collect();
        make_batch(
            target,
            p,
            &seqs,
            &sub_index,
            64,
            0.0,
            0.0,
            &mut StdRng::seed_from_u64(0),
            dtype,
        )
        .unwrap()
    }

    /// The tiny target 5, a new head of `kind` on it and its training data
    /// (the head's tap).
    fn setup(kind: HeadKind, dtype: DType) -> (Model, HeadParams, Vec<TrainSequence>) {
        let target = tiny_model(5).unwrap();
        let (sub, _) = frequent_tokens(&tiny_training_data(5, &FeatureTap::Final).unwrap(), 48, 64);
        let p = HeadParams::init(&target, sub, 3, dtype, kind).unwrap();
        let data = tiny_training_data(5, &p.tap).unwrap();
        (target, p, data)
    }

    #[test]
    fn the_training_graph_computes_what_the_engine_runs() {
        for kind in KINDS {
            let (target, mut p, data) = setup(kind, DType::F32);
            // Non-trivial norms and bias, so their placement is checked too.
            let h = p.config.hidden_size;
            for (k, (_, var)) in p.vars.iter_mut().enumerate().filter(|(_, v)| v.1.rank() == 1) {
                let values: Vec<f32> = (0..h).map(|i| 1.0 + ((i + 7 * k) as f32 * 0.11).cos() * 0.5).collect();
                var.set(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap();
            }
            let seq = &data[3];
            let n = seq.tokens.len();
            let batch = no_noise_batch(&target, &p, std::slice::from_ref(seq), DType::F32);
            let steps = forward(&p, &batch, 3).unwrap();
            let rows = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let head = DraftHead::new(&p.weights().unwrap(), target.config(), WeightFormat::AsShipped).unwrap();
            assert_eq!(head.kind(), kind);
            let fw = p.tap.width(h);
            let mut states = vec![0.0; fw];
            states.extend_from_slice(&seq.features[..(n - 1) * fw]);
            let inputs = head.input_features(&states).unwrap();
            let layout = KvLayout {
                num_blocks: n.div_ceil(4),
                block_size: 4,
                num_layers: 1,
                kv_size: head.kv_size(),
                scratch_slots: 0,
            };
            let table: Vec<_> = (0..layout.num_blocks as u32).map(heterospec_kv::BlockId).collect();
            // The engine's head on positions start..end with `inputs` rows.
            let run = |kv: &mut KvStorage, start: usize, end: usize, inputs: &[f32]| {
                let run = SeqRun::causal(seq.tokens[start..end].to_vec(), start, &table, 4)
                    .unwrap()
                    .with_all_logits();
                head.forward(&target, &RaggedBatch { seqs: vec![run] }, inputs, kv)
                    .unwrap()
            };
            let close = |a: &[f32], b: &[f32], what: &str| {
                assert_eq!(a.len(), b.len(), "{kind:?} {what}");
                assert!(a.iter().any(|&x| x.abs() > 0.1), "{kind:?} {what}");
                let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-3, "{kind:?} {what}: max difference {worst}");
            };
            // Step 0 over the whole sequence in two runs: the second reads
            // the first's K/V from paged storage.
            let mut kv = KvStorage::new(layout);
            let (split, mut got_hidden, mut got_logits) = (n / 2, Vec::new(), Vec::new());
            for (start, end) in [(0, split), (split, n)] {
                let (l, hd) = run(&mut kv, start, end, &inputs[start * h..end * h]);
                got_logits.extend(l);
                got_hidden.extend(hd);
            }
            assert!(got_hidden.len() == n * h);
            close(&rows(&steps[0].0), &got_hidden, "step 0 outputs");
            close(&rows(&steps[0].1), &got_logits, "step 0 logits");
            if kind == HeadKind::Eagle {
                assert_eq!(steps.len(), 1);
                continue;
            }
            // Step j, row q: a draft chain of depth j after the context
            // 0..=q-j, each node reading its parent's output.
            let dv = p.sub_vocab.len();
            for (j, q) in [(1, n - 1), (2, n - 1), (2, n / 2 + 1)] {
                let mut kv = KvStorage::new(layout);
                let (_, hd) = run(&mut kv, 0, q - j + 1, &inputs[..(q - j + 1) * h]);
                let mut parent = hd[(q - j) * h..].to_vec();
                let mut logits = Vec::new();
                for pos in q - j + 1..=q {
                    (logits, parent) = run(&mut kv, pos, pos + 1, &parent);
                }
                close(
                    &rows(&steps[j].0)[q * h..(q + 1) * h],
                    &parent,
                    &format!("step {j} row {q} output"),
                );
                close(
                    &rows(&steps[j].1)[q * dv..(q + 1) * dv],
                    &logits,
                    &format!("step {j} row {q} logits"),
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences_and_training_lowers_the_loss() {
        for kind in KINDS {
            // Gradient check in f64 on a few entries of every tensor
            // (EAGLE-3 through three training-time-test steps).
            let (target, p, data) = setup(kind, DType::F64);
            let batch = no_noise_batch(&target, &p, &data[..4], DType::F64);
            let (total, ..) = loss(&p, &batch, 0.5, 3).unwrap();
            let grads = total.backward().unwrap();
            let eps = 1e-5;
            for (name, var) in &p.vars {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                for idx in [0, base.len() / 3, base.len() - 1] {
                    let at = |delta: f64| {
                        let mut w = base.clone();
                        w[idx] += delta;
                        var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                            .unwrap();
                        loss(&p, &batch, 0.5, 3).unwrap().0.to_scalar::<f64>().unwrap()
                    };
                    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    assert!(
                        (numeric - g[idx]).abs() <= 1e-6 + 1e-4 * numeric.abs().max(g[idx].abs()),
                        "{kind:?} {name}[{idx}]: autograd {} finite difference {numeric}",
                        g[idx]
                    );
                }
            }
            // A short run lowers the loss on the training data.
            let (target, mut p, data) = setup(kind, DType::F32);
            let batch = no_noise_batch(&target, &p, &data, DType::F32);
            let cfg = TrainConfig {
                max_len: 64,
                epochs: 15,
                learning_rate: 3e-3,
                warmup_steps: 5,
                ..TrainConfig::default()
            };
            let before = loss(&p, &batch, 0.1, cfg.ttt_steps).unwrap();
            let mut steps = 0;
            let epochs = train(&target, &mut p, &data, &cfg, |_, _, _| steps += 1).unwrap();
            assert_eq!(steps, 15 * data.len().div_ceil(8));
            let after = loss(&p, &batch, 0.1, cfg.ttt_steps).unwrap();
            let total = |l: &(Tensor, f64, f64, f64)| scalar(&l.0).unwrap();
            assert!(
                total(&after) < 0.7 * total(&before)
                    && after.1 <= 0.7 * before.1
                    && after.2 < 0.7 * before.2,
                "{kind:?}: loss {:.4} -> {:.4}, feature loss {:.4} -> {:.4}, token loss {:.3} -> {:.3} (epochs {epochs:?})",
                total(&before),
                total(&after),
                before.1,
                after.1,
                before.2,
                after.2
            );
            assert!(after.3 > before.3, "{kind:?}: top-1 {:.3} -> {:.3}", before.3, after.3);
        }
    }

    #[test]
    fn frequent_tokens_rank_answers_and_fill_up() {
        let seq = |tokens: Vec<u32>, answer_start| TrainSequence {
            features: vec![],
            tokens,
            answer_start,
        };
        let data = [seq(vec![9, 9, 9, 5, 5, 7], 3), seq(vec![1, 7, 5], 1)];
        let (ids, coverage) = frequent_tokens(&data, 4, 10);
        assert_eq!(ids, vec![5, 7, 0, 1]); // 5 x3, 7 x2, then the lowest unused
        assert!((coverage - 1.0).abs() < 1e-9);
        let (ids, coverage) = frequent_tokens(&data, 1, 10);
        assert_eq!(ids, vec![5]);
        assert!((coverage - 0.6).abs() < 1e-9);
    }
}
