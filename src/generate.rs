//! `heterospec generate`: one prompt, in-process, streamed to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use heterospec_engine::runner::SpecStats;
use heterospec_engine::spec::SpecMode;
use heterospec_engine::SamplingParams;
use heterospec_router::{ChatMessage, StopCriteria};
use serde::Serialize;

use crate::local::{EngineArgs, LocalEngine};

use heterospec_router::validate::DEFAULT_MAX_NEW_TOKENS;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// GGUF model file.
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    /// Prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A Jinja chat template to use instead of the model's own (or of its
    /// family's, for a GGUF without one). With `--server`, the server's
    /// router takes it (`router --chat-template`).
    #[arg(long, requires = "chat", conflicts_with = "server")]
    pub chat_template: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables the top-k cut.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed for sampling (same seed, same output).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this string appears (repeatable); it is not returned.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Speculative decoding: off, fixed (static tree), hetero (entropy
    /// tiers under the global budget) or auto (hetero, plain where
    /// speculation does not pay).
    #[arg(long, default_value = "auto")]
    pub speculation: SpecMode,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Send the request to a heterospec server (e.g. http://127.0.0.1:50051)
    /// instead of running the model in this process.
    #[arg(long, env = "HETEROSPEC_SERVER")]
    pub server: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Serialize)]
pub struct JsonOutput<'a> {
    pub prompt_token_ids: &'a [u32],
    pub token_ids: &'a [u32],
    pub text: &'a str,
    pub finish_reason: &'a str,
    pub tokens_per_second: f64,
    /// Absent when the server did not report it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speculation: Option<SpecJson>,
}

/// Speculation statistics of one generation.
#[derive(Serialize)]
pub struct SpecJson {
    /// Steps that committed tokens.
    pub steps: usize,
    /// Draft tokens verified by the target.
    pub verified_tokens: usize,
    pub accepted_tokens: usize,
    /// `1 + accepted_tokens / steps`.
    pub mean_acceptance_length: f64,
    /// Steps per HeteroSpec tier B0..B7.
    pub tier_steps: Vec<usize>,
}

impl From<&SpecStats> for SpecJson {
    fn from(s: &SpecStats) -> Self {
        SpecJson {
            steps: s.steps,
            verified_tokens: s.draft_tokens,
            accepted_tokens: s.accepted_tokens,
            mean_acceptance_length: s.mean_acceptance_length(),
            tier_steps: s.tier_steps[..8].to_vec(),
        }
    }
}

/// Generates in this process (`main` sends `--server` runs to `client`).
pub fn run(args: GenerateArgs) -> Result<()> {
    let mut local = LocalEngine::load(&args.model, &args.engine)
        .with_context(|| format!("cannot load model {}", args.model.display()))?;
    if let Some(file) = &args.chat_template {
        local.tokenizer.set_chat_template_file(file)?;
    }
    let text = if args.chat {
        local
            .tokenizer
            .apply_chat_template(&[ChatMessage::new("user", args.prompt.clone())])?
    } else {
        args.prompt.clone()
    };
    let prompt_ids = local.tokenizer.encode(&text)?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        top_logprobs: 0,
    };
    let criteria = StopCriteria {
        max_new_tokens: args.max_new_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    };
    let json = args.json;
    let mut stdout = std::io::stdout().lock();
    let generation = local.generate(prompt_ids, sampling, args.speculation, criteria, |delta| {
        if !json {
            let _ = stdout.write_all(delta.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if json {
        let out = JsonOutput {
            prompt_token_ids: &generation.prompt_token_ids,
            token_ids: &generation.token_ids,
            text: &generation.text,
            finish_reason: generation.finish_reason.as_str(),
            tokens_per_second: generation.decode_tokens_per_second(),
            speculation: Some(SpecJson::from(&generation.speculation)),
        };
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens in {:.3} s; {} tokens, {:.1} tok/s; mean acceptance length {:.2}; finish: {}]",
            generation.prompt_token_ids.len(),
            generation.prefill_seconds,
            generation.token_ids.len(),
            generation.decode_tokens_per_second(),
            generation.speculation.mean_acceptance_length(),
            generation.finish_reason.as_str()
        );
    }
    Ok(())
}
