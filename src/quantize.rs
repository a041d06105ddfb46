//! `heterospec quantize`: rewrites a GGUF with its matrices in another
//! block type (e.g. Q4_0 or Q2_K of the same weights), keeping metadata,
//! tokenizer and 1-D tensors. The result is a real draft model for
//! `--drafter model` (same vocabulary, high agreement, cheaper bits), or a
//! float file (`f16`) to measure formats on.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use clap::Args;
use heterospec_engine::requantize::requantize_gguf;

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Source GGUF.
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    /// Destination GGUF.
    #[arg(long)]
    pub out: PathBuf,
    /// Block type of the matrices: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, f16, bf16, f32.
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
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "f32" => GgmlDType::F32,
        other => bail!("unknown --dtype `{other}`"),
    })
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    crate::fetch::ensure_default_model(&args.model)?;
    let done = requantize_gguf(&args.model, &args.out, dtype)
        .with_context(|| format!("cannot rewrite {}", args.model.display()))?;
    eprintln!(
        "wrote {} ({} matrices as {}, {} other tensors as f32)",
        args.out.display(),
        done.matrices,
        args.dtype,
        done.others
    );
    Ok(())
}
