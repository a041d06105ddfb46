//! Training a draft head on the target's own features, with candle's
//! autograd on the CPU.
//!
//! Each training sequence is a prompt and the target's answer (greedy or
//! sampled), with the target's states of the head's tap at every position.
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

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::backend::FeatureTap;
use crate::error::{EngineError, Result};
use crate::model::Model;
mod features;
mod graph;
pub use features::{feature_rms, frequent_tokens, target_features, target_features_packed};
pub use graph::{forward, loss};
use graph::{hf_rope_tables, scalar};

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
    /// Epochs already done (a resumed run continues the schedule there).
    pub start_epoch: usize,
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
            start_epoch: 0,
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
    /// model). It reads `kind.default_tap`. EAGLE heads may have several
    /// decoder `layers` (each after the first with an input norm); EAGLE-3
    /// heads have one.
    pub fn init(
        target: &Model,
        sub_vocab: Vec<u32>,
        seed: u64,
        dtype: DType,
        kind: HeadKind,
        layers: usize,
    ) -> Result<Self> {
        kind.check_layers(layers)
            .map_err(|e| EngineError::Config(format!("{layers} head layers: {e}")))?;
        let c = target.config();
        let tap = kind.default_tap(c.num_layers);
        let config = HeadConfig {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_heads,
            num_key_value_heads: c.num_kv_heads,
            head_dim: Some(c.head_dim),
            num_hidden_layers: layers,
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
        let h = c.hidden_size;
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
        let ones = || Var::ones(h, dtype, &Device::Cpu);
        for layer in 0..layers {
            let names = kind.layer_names(layer);
            for (name, shape) in names.matrices.iter().zip(config.layer_shapes(layer, attn_in)) {
                vars.push((name.clone(), random(shape)?));
            }
            vars.push((names.post_norm.clone(), ones()?));
            if layer > 0 {
                vars.push((names.input_norm.clone(), ones()?));
            }
        }
        match kind {
            HeadKind::Eagle => vars.push((FC_BIAS.to_string(), Var::zeros(h, dtype, &Device::Cpu)?)),
            HeadKind::Eagle3 => {
                for name in [EAGLE3_INPUT_NORM, EAGLE3_HIDDEN_NORM, OUTPUT_NORM] {
                    vars.push((name.to_string(), ones()?));
                }
            }
        }
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

    /// Target id -> row of the sub-vocabulary.
    pub fn sub_index(&self) -> HashMap<u32, u32> {
        self.sub_vocab.iter().enumerate().map(|(i, &t)| (t, i as u32)).collect()
    }

    fn get(&self, name: &str) -> &Tensor {
        self.try_get(name).expect("every head tensor is a parameter")
    }

    fn try_get(&self, name: &str) -> Option<&Tensor> {
        self.vars.iter().find(|v| v.0 == name).map(|v| v.1.as_tensor())
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
#[allow(clippy::too_many_arguments)] // one call site, in `train`
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

/// Per-epoch means of the loss terms.
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochStats {
    pub loss: f64,
    pub feature_loss: f64,
    pub token_loss: f64,
    pub top1: f64,
}

/// Trains `params` on `data` from epoch `cfg.start_epoch` on;
/// `progress(step, steps, stats of the step)` after each optimizer step,
/// `epoch_done(epoch, params, epoch means)` after each epoch (to evaluate
/// and checkpoint). Returns the per-epoch means of the epochs it ran.
pub fn train(
    target: &Model,
    params: &mut HeadParams,
    data: &[TrainSequence],
    cfg: &TrainConfig,
    mut progress: impl FnMut(usize, usize, &EpochStats),
    mut epoch_done: impl FnMut(usize, &HeadParams, &EpochStats) -> Result<()>,
) -> Result<Vec<EpochStats>> {
    if data.is_empty() {
        return Err(EngineError::Config("no training sequences".into()));
    }
    let dtype = params.vars[0].1.dtype();
    let sub_index = params.sub_index();
    let (noise_amp, prompt_dropout) = match params.kind {
        HeadKind::Eagle => (cfg.noise * feature_rms(data), 0.0),
        HeadKind::Eagle3 => (0.0, cfg.prompt_dropout), // training-time test instead of noise
    };
    // Visiting orders come from one stream, noise and dropout from one
    // stream per epoch, so a resumed run draws what an uninterrupted one
    // would.
    let mut order_rng = StdRng::seed_from_u64(cfg.seed ^ 0x5EED);
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
    let mut step = cfg.start_epoch.min(cfg.epochs) * batches.len();
    let first_step = step;
    for epoch in 0..cfg.epochs {
        let mut visit: Vec<usize> = (0..batches.len()).collect();
        visit.shuffle(&mut order_rng);
        if epoch < cfg.start_epoch {
            continue;
        }
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5EED ^ ((epoch as u64 + 1) << 32));
        let mut sum = EpochStats::default();
        for &bi in &visit {
            let lr = if step < cfg.warmup_steps {
                cfg.learning_rate * (step + 1) as f64 / cfg.warmup_steps as f64
            } else {
                let done = (step - cfg.warmup_steps) as f64 / (steps - cfg.warmup_steps).max(1) as f64;
                // A resumed run's optimizer starts without moments: it warms
                // up again, into the schedule.
                let ramp = if first_step > 0 {
                    ((step - first_step + 1) as f64 / cfg.warmup_steps.max(1) as f64).min(1.0)
                } else {
                    1.0
                };
                ramp * cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * done).cos()))
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
        let means = EpochStats {
            loss: sum.loss / n,
            feature_loss: sum.feature_loss / n,
            token_loss: sum.token_loss / n,
            top1: sum.top1 / n,
        };
        epoch_done(epoch + 1, params, &means)?;
        epochs.push(means);
    }
    Ok(epochs)
}

/// How well the head predicts sequences it was not trained on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeldOutStats {
    /// Cross-entropy of the first draft position (over answer tokens in the
    /// sub-vocabulary).
    pub token_loss: f64,
    /// Top-1 agreement with the answer's next token at each draft depth
    /// (depth `j` reads the head's own outputs of depths `< j`; EAGLE
    /// heads are measured at the first depth only); a token outside the
    /// sub-vocabulary is a miss.
    pub top1: Vec<f64>,
}

impl HeldOutStats {
    /// Estimated mean acceptance length of a chain of `depth` drafts, when
    /// each depth is right with its measured top-1 independently (depths
    /// past the measured ones as the last measured).
    pub fn tau_estimate(&self, depth: usize) -> f64 {
        let (mut tau, mut p) = (1.0, 1.0);
        for d in 0..depth {
            p *= self.top1.get(d).or(self.top1.last()).copied().unwrap_or(0.0);
            tau += p;
        }
        tau
    }
}

/// The head's held-out figures on `data` (no noise, no dropout, no
/// update), token-weighted over batches.
pub fn evaluate(
    target: &Model,
    params: &HeadParams,
    data: &[TrainSequence],
    cfg: &TrainConfig,
) -> Result<HeldOutStats> {
    let dtype = params.vars[0].1.dtype();
    let sub_index = params.sub_index();
    let steps = match params.kind {
        HeadKind::Eagle => 1,
        HeadKind::Eagle3 => cfg.ttt_steps.max(1),
    };
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| (data[i].tokens.len(), i));
    let mut rng = StdRng::seed_from_u64(0);
    let (mut loss_sum, mut loss_rows, mut hits, mut counted) = (0f64, 0f64, vec![0f64; steps], vec![0f64; steps]);
    for chunk in order.chunks(cfg.batch_size.max(1)) {
        let seqs: Vec<&TrainSequence> = chunk.iter().map(|&i| &data[i]).collect();
        let batch = make_batch(
            target,
            params,
            &seqs,
            &sub_index,
            cfg.max_len,
            0.0,
            0.0,
            &mut rng,
            dtype,
        )?;
        let outs = forward(params, &batch, steps, None)?;
        let (_, t, _) = batch.embeds.dims3()?;
        let mask = batch.token_mask.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let next = batch.next.to_vec1::<u32>()?;
        // Rows that predict an answer token: those whose next token is
        // outside the sub-vocabulary count as misses.
        let mut predicts = vec![false; mask.len()];
        for (i, s) in seqs.iter().enumerate() {
            let len = s.tokens.len().min(cfg.max_len);
            for q in s.answer_start.max(1) - 1..len.saturating_sub(1) {
                predicts[i * t + q] = true;
            }
        }
        for (j, (_, logits)) in outs.iter().enumerate() {
            let logits = logits.to_dtype(DType::F32)?;
            let best = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
            if j == 0 {
                let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?.to_vec2::<f32>()?;
                for (r, row) in logp.iter().enumerate() {
                    if mask[r] > 0.0 {
                        loss_sum -= row[next[r] as usize] as f64;
                        loss_rows += 1.0;
                    }
                }
            }
            for r in 0..mask.len() {
                // Depth j needs j earlier rows of the same sequence.
                if predicts[r] && r % t >= j {
                    counted[j] += 1.0;
                    hits[j] += (mask[r] > 0.0 && best[r] == next[r]) as u8 as f64;
                }
            }
        }
    }
    Ok(HeldOutStats {
        token_loss: loss_sum / loss_rows.max(1.0),
        top1: hits.iter().zip(&counted).map(|(h, c)| h / c.max(1.0)).collect(),
    })
}

#[cfg(test)]
mod tests;
