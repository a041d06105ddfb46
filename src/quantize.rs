//! `heterospec quantize`: rewrites a GGUF with its matrices in another
//! block type (e.g. Q4_0 or Q2_K of the same weights), keeping metadata,
//! tokenizer and 1-D tensors. The result is a real draft model for
//! `--drafter model`: same vocabulary, high agreement, cheaper bits.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use clap::Args;
use heterospec_engine::ModelTensors;

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Source GGUF.
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    /// Destination GGUF.
    #[arg(long)]
    pub out: PathBuf,
    /// Block type of the matrices: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k.
    #[arg(long, default_value = "q4_0")]
    pub dtype: String,
}

fn parse_dtype(name: &str) -> Result<GgmlDType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        other => bail!("unknown --dtype `{other}`"),
    })
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    crate::fetch::ensure_default_model(&args.model)?;
    let (tensors, content) =
        ModelTensors::read_gguf(&args.model).with_context(|| format!("cannot read {}", args.model.display()))?;
    let mut names: Vec<&String> = tensors.tensors.keys().collect();
    names.sort();
    let mut out_tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut converted = 0;
    for name in names {
        let t = &tensors.tensors[name];
        let dims = t.shape().dims();
        let row = *dims.last().unwrap_or(&0);
        let q = if dims.len() == 2 && row % dtype.block_size() == 0 {
            converted += 1;
            QTensor::quantize(&t.dequantize(&Device::Cpu)?, dtype)?
        } else {
            QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::F32)?
        };
        out_tensors.push((name.clone(), q));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = out_tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let tmp = args.out.with_extension("gguf.partial");
    let mut file = BufWriter::new(File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?);
    gguf_file::write(&mut file, &metadata, &tensor_refs)?;
    drop(file);
    std::fs::rename(&tmp, &args.out)?;
    eprintln!(
        "wrote {} ({converted} matrices as {}, {} other tensors as f32)",
        args.out.display(),
        args.dtype,
        out_tensors.len() - converted
    );
    Ok(())
}
