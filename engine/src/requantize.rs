//! A GGUF rewritten with its matrices in another block type (Q4_0 or Q2_K
//! of the same weights for a draft model, F16 for a float file), keeping
//! the metadata, tokenizer and 1-D tensors.
//!
//! Invariant: the output is the same bytes for the same input and block
//! type (metadata and tensors in name order), so a file made here can be
//! checked against a reference made from it once.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{EngineError, Result};
use crate::weights::ModelTensors;

/// Matrices converted and other tensors (kept as f32) in the file written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requantized {
    pub matrices: usize,
    pub others: usize,
}

/// Writes `src` to `dst` with every matrix whose rows fit `dtype`'s blocks
/// in `dtype` (dequantized first) and every other tensor as f32.
pub fn requantize_gguf(src: &Path, dst: &Path, dtype: GgmlDType) -> Result<Requantized> {
    let (tensors, content) = ModelTensors::read_gguf(src)?;
    let mut names: Vec<&String> = tensors.tensors.keys().collect();
    names.sort();
    let mut out: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut matrices = 0;
    for name in names {
        let t = &tensors.tensors[name];
        let dims = t.shape().dims();
        let row = *dims.last().unwrap_or(&0);
        let target = if dims.len() == 2 && row % dtype.block_size() == 0 {
            matrices += 1;
            dtype
        } else {
            GgmlDType::F32
        };
        out.push((name.clone(), QTensor::quantize(&t.dequantize(&Device::Cpu)?, target)?));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    metadata.sort_by_key(|(k, _)| *k);
    let tensor_refs: Vec<(&str, &QTensor)> = out.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let tmp = dst.with_extension("gguf.partial");
    let io = |source| EngineError::ModelRead {
        path: tmp.clone(),
        source,
    };
    let written = (|| -> Result<()> {
        let mut file = BufWriter::new(File::create(&tmp).map_err(io)?);
        gguf_file::write(&mut file, &metadata, &tensor_refs)?;
        let file = file.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dst).map_err(io)?;
    Ok(Requantized {
        matrices,
        others: out.len() - matrices,
    })
}
