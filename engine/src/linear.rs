//! Linear layers on flat rows: how weights are held (`WeightFormat`) and
//! applied, through our batched 8-bit/4-bit GEMM (`qgemm`) or candle's
//! quantized matmul.
//!
//! Invariant: a row's output depends on that row alone (no kernel picks its
//! method by row count), so a token's logits are the same in any batch.

use std::cell::OnceCell;
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::qgemm::{self, Q4Matrix, Q8Matrix, Q8Rows};

/// How linear-layer weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Requantize to 8-bit blocks at load (about 1 s) and multiply with our
    /// batched GEMM (`qgemm`), which reuses each weight block across the
    /// tokens of a batch. Any GGUF weight type loads this way.
    Q8_0,
    /// Per weight type, by what it costs against llama.cpp running the file
    /// at its own precision: 4-bit GGUF blocks (Q4_0, Q4_1) kept at 4 bits
    /// in our batched GEMM (half the memory traffic per token, the file's
    /// exact values); other quantized types at 8 bits (on Gemma 3's Q4_K_M
    /// file, no further from llama.cpp than f32); float weights (F16, BF16,
    /// F32) exact, through candle's f32 matmul (8 bits put an F16 file 40x
    /// further from llama.cpp: p90 0.47 logits against 0.012). The default.
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
    pub(crate) out_features: usize,
}

impl Linear {
    pub(crate) fn new(tensor: QTensor, format: WeightFormat) -> Result<Self> {
        let out_features = tensor.shape().dims()[0];
        let in_features = tensor.shape().dims()[1];
        let float = matches!(tensor.dtype(), GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::F32);
        if format == WeightFormat::Native && float {
            return Self::new(tensor, WeightFormat::F32);
        }
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

    pub(crate) fn forward(&self, input: &LinearInput<'_>) -> Result<Vec<f32>> {
        let mut out = vec![0.0; input.rows * self.out_features];
        self.forward_into(input, &mut out)?;
        Ok(out)
    }

    /// [`Linear::forward`] into `out (rows, out_features)`, which the
    /// caller keeps across layers.
    pub(crate) fn forward_into(&self, input: &LinearInput<'_>, out: &mut [f32]) -> Result<()> {
        let (x, rows) = (input.x, input.rows);
        assert_eq!(out.len(), rows * self.out_features, "output buffer size");
        match &self.weight {
            LinearWeight::Q8(w) => w.matmul_q8(input.quantized(), out, qgemm::kernel_kind()),
            LinearWeight::Q4(w) => w.matmul_q8(input.quantized(), out, qgemm::kernel_kind()),
            LinearWeight::Candle(w) => {
                let input = Tensor::from_slice(x, (rows, x.len() / rows), &Device::Cpu)?;
                let product = input.apply(w)?; // (rows, out_features)
                out.copy_from_slice(&product.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }
}

/// `outs[i] = x · wᵀ` for each of `linears`, which share their input (q, k
/// and v; gate and up), into buffers the caller keeps across layers: one
/// parallel stage for all of them where our GEMM holds every weight, else
/// one layer after another. The same values either way.
pub(crate) fn forward_many_into<const N: usize>(
    input: &LinearInput<'_>,
    linears: [&Linear; N],
    mut outs: [&mut [f32]; N],
) -> Result<()> {
    let weights: Vec<qgemm::QWeight<'_>> = linears
        .iter()
        .filter_map(|l| match &l.weight {
            LinearWeight::Q8(w) => Some(qgemm::QWeight::Q8(w)),
            LinearWeight::Q4(w) => Some(qgemm::QWeight::Q4(w)),
            LinearWeight::Candle(_) => None,
        })
        .collect();
    if weights.len() < N {
        for (l, out) in linears.into_iter().zip(outs) {
            l.forward_into(input, out)?;
        }
        return Ok(());
    }
    for (l, out) in linears.iter().zip(outs.iter()) {
        assert_eq!(out.len(), input.rows * l.out_features, "output buffer size");
    }
    qgemm::matmul_many(&weights, input.quantized(), &mut outs, qgemm::kernel_kind());
    Ok(())
}

/// The input of one or more linear layers, `(rows, in)`: quantized to 8-bit
/// blocks at most once however many layers read it (q, k and v share one;
/// gate and up another).
pub(crate) struct LinearInput<'a> {
    x: &'a [f32],
    rows: usize,
    quantized: OnceCell<Q8Rows>,
}

impl<'a> LinearInput<'a> {
    pub(crate) fn new(x: &'a [f32], rows: usize) -> Self {
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
