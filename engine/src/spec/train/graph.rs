//! The head's training graph in candle: the same computation as
//! `DraftHead::forward` (in Hugging Face's RoPE order), over a padded batch,
//! with EAGLE-3's training-time-test steps, and its loss.
//!
//! Invariant: step 0 of row `q` sees exactly what the engine's head sees at
//! `q`; step `j` sees what a depth-`j` draft node sees (tests compare both).

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::spec::head::{
    HeadConfig, HeadKind, LayerNames, EAGLE3_HIDDEN_NORM, EAGLE3_INPUT_NORM, FC, FC_BIAS, LM_HEAD, OUTPUT_NORM,
};
use crate::spec::train::{Batch, HeadParams};

/// `(b, 1, t, head_dim)` cos and sin for positions `0..t`, each frequency
/// repeated over both halves (Hugging Face's `rotate_half` order).
pub(super) fn hf_rope_tables(head: &HeadConfig, b: usize, t: usize) -> Result<(Tensor, Tensor)> {
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
    /// `input` `(b*t, in)` through layer `names`, each `(b, heads, t, hd)`.
    fn qkv(&self, input: &Tensor, names: &LayerNames) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.p.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let m = &names.matrices;
        let q = self.rope(&self.heads(self.lin(input, &m[0])?, nh)?)?;
        let k = self.rope(&self.heads(self.lin(input, &m[1])?, nkv)?)?;
        let v = self.heads(self.lin(input, &m[2])?, nkv)?;
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
    fn finish_layer(&self, x: &Tensor, attn: Tensor, names: &LayerNames) -> Result<Tensor> {
        let c = &self.p.config;
        let m = &names.matrices;
        let attn = attn
            .transpose(1, 2)?
            .reshape((self.b * self.t, c.num_attention_heads * c.head_dim()))?;
        let x = (x + self.lin(&attn, &m[3])?)?;
        let normed = rms_norm(&x, self.p.get(&names.post_norm), c.rms_norm_eps as f64)?;
        let gate = self.lin(&normed, &m[4])?.silu()?;
        let up = self.lin(&normed, &m[5])?;
        Ok((&x + self.lin(&(gate * up)?, &m[6])?)?)
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
/// `(b*t, h)` output stream and the logits `(rows, draft_vocab)` of the
/// rows listed in `rows` (`None`: all `b*t`). The output layer is the
/// widest product of the head, so training asks only for the rows its
/// loss counts.
pub fn forward(p: &HeadParams, batch: &Batch, steps: usize, rows: Option<&Tensor>) -> Result<Vec<(Tensor, Tensor)>> {
    let picked = |x: &Tensor| -> Result<Tensor> {
        Ok(match rows {
            Some(rows) => x.index_select(rows, 0)?,
            None => x.clone(),
        })
    };
    let c = &p.config;
    let (b, t, h) = batch.embeds.dims3()?;
    let g = Graph { p, batch, b, t };
    let scale = (c.head_dim() as f64).sqrt();
    let fw = batch.features_in.dim(2)?;
    let dtype = batch.embeds.dtype();
    match p.kind {
        HeadKind::Eagle => {
            let input = Tensor::cat(&[&batch.embeds, &batch.features_in], 2)?.reshape((b * t, 2 * h))?;
            let mut x = g.lin(&input, FC)?;
            if let Some(bias) = p.try_get(FC_BIAS) {
                x = x.broadcast_add(bias)?;
            }
            let mask = g.causal_mask(0, dtype)?;
            for layer in 0..c.num_hidden_layers {
                let names = p.kind.layer_names(layer);
                // The first layer reads `fc`'s output as it is unless the
                // head has a norm there; later layers norm the stream.
                let input = match p.try_get(&names.input_norm) {
                    Some(w) => rms_norm(&x, w, c.rms_norm_eps as f64)?,
                    None => x.clone(),
                };
                let (q, k, v) = g.qkv(&input, &names)?;
                let scores = (q.matmul(&k.t()?.contiguous()?)? / scale)?.broadcast_add(&mask)?;
                let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
                x = g.finish_layer(&x, weights.matmul(&v.contiguous()?)?, &names)?;
            }
            // A loaded head may norm before its output layer, as the engine does.
            let logits = match p.try_get(OUTPUT_NORM) {
                Some(w) => g.lin(&rms_norm(&picked(&x)?, w, c.rms_norm_eps as f64)?, LM_HEAD)?,
                None => g.lin(&picked(&x)?, LM_HEAD)?,
            };
            Ok(vec![(x, logits)])
        }
        HeadKind::Eagle3 => {
            let eps = c.rms_norm_eps as f64;
            let embeds = rms_norm(&batch.embeds.reshape((b * t, h))?, p.get(EAGLE3_INPUT_NORM), eps)?;
            let mut x_in = g.lin(&batch.features_in.reshape((b * t, fw))?, FC)?;
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            let mut out = Vec::new();
            let names = p.kind.layer_names(0);
            for j in 0..steps.max(1) {
                let input = Tensor::cat(&[&embeds, &rms_norm(&x_in, p.get(EAGLE3_HIDDEN_NORM), eps)?], 1)?;
                let (q, k, v) = g.qkv(&input, &names)?;
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
                let x = g.finish_layer(&x_in, attn, &names)?;
                let logits = g.lin(&rms_norm(&picked(&x)?, p.get(OUTPUT_NORM), eps)?, LM_HEAD)?;
                // Next step: row q reads this step's output of row q - 1.
                x_in = shift(&x.reshape((b, t, h))?, 1, 1)?.reshape((b * t, h))?;
                out.push((x, logits));
            }
            Ok(out)
        }
    }
}

/// A one-element tensor's value.
pub(super) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Loss terms of a batch: `(total, feature term, cross-entropy, top-1
/// accuracy on counted rows)`; for EAGLE-3 the cross-entropy and top-1 are
/// those of step 0 and the total is the `0.8^j`-weighted mean over steps.
pub fn loss(p: &HeadParams, batch: &Batch, cls_weight: f64, steps: usize) -> Result<(Tensor, f64, f64, f64)> {
    let (_, t, _) = batch.embeds.dims3()?;
    let dtype = batch.token_mask.dtype();
    // Only rows that count get logits (masked rows add nothing to the loss
    // or its gradient); a batch without one keeps a single row, masked.
    let mut rows: Vec<u32> = batch
        .token_mask
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .iter()
        .enumerate()
        .filter(|(_, &m)| m > 0.0)
        .map(|(r, _)| r as u32)
        .collect();
    if rows.is_empty() {
        rows.push(0);
    }
    let row_ids = Tensor::new(&rows[..], &Device::Cpu)?;
    let token_mask = batch.token_mask.index_select(&row_ids, 0)?;
    let next = batch.next.index_select(&row_ids, 0)?;
    let outs = forward(p, batch, steps, Some(&row_ids))?;
    let cross_entropy = |logits: &Tensor, mask: &Tensor| -> Result<(Tensor, f64)> {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let picked = logp.gather(&next.unsqueeze(1)?, 1)?.squeeze(1)?;
        let tsum = scalar(&mask.sum_all()?)?.max(1.0);
        let ce = ((picked * mask)?.sum_all()?.neg()? / tsum)?;
        let top1 = logits.argmax(D::Minus1)?.eq(&next)?.to_dtype(dtype)?;
        Ok((ce, scalar(&(top1 * mask)?.sum_all()?)? / tsum))
    };
    let (ce0, acc) = cross_entropy(&outs[0].1, &token_mask)?;
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
            let mut total = ce0.clone();
            let mut weight_sum = 1.0;
            for (j, (_, logits)) in outs.iter().enumerate().skip(1) {
                // Rows q >= j have a step-j input.
                let from_j: Vec<f32> = rows
                    .iter()
                    .map(|&r| if r as usize % t >= j { 1.0 } else { 0.0 })
                    .collect();
                let n = from_j.len();
                let mask = (Tensor::from_vec(from_j, n, &Device::Cpu)?.to_dtype(dtype)? * &token_mask)?;
                let w = 0.8f64.powi(j as i32);
                total = (total + (cross_entropy(logits, &mask)?.0 * w)?)?;
                weight_sum += w;
            }
            let total = (total / weight_sum)?;
            Ok((total, 0.0, scalar(&ce0)?, acc))
        }
    }
}
