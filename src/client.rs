//! `heterospec generate --server URL`: the gRPC client, with the same flags
//! and the same `--json` output as in-process generation.

use std::time::Instant;

use anyhow::{Context, Result};
use heterospec_proto::v1 as pb;
use heterospec_proto::v1::generation_client::GenerationClient;

use crate::generate::{GenerateArgs, JsonOutput, SpecJson};
use heterospec_engine::spec::SpecMode;

/// What a finished remote generation returned.
#[derive(Debug, Clone, Default)]
pub struct RemoteGeneration {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: String,
    /// Arrival of the first and last token, relative to the request.
    pub first_token_seconds: f64,
    pub total_seconds: f64,
    pub speculation: Option<pb::SpeculationStats>,
}

impl RemoteGeneration {
    pub fn tokens_per_second(&self) -> f64 {
        let n = self.token_ids.len().saturating_sub(1);
        let span = self.total_seconds - self.first_token_seconds;
        if n == 0 || span <= 0.0 {
            0.0
        } else {
            n as f64 / span
        }
    }
}

pub fn finish_reason_str(code: i32) -> &'static str {
    match pb::FinishReason::try_from(code) {
        Ok(pb::FinishReason::Length) => "length",
        Ok(pb::FinishReason::Eos) => "eos",
        Ok(pb::FinishReason::Stop) => "stop",
        Ok(pb::FinishReason::Cancelled) => "cancelled",
        _ => "unspecified",
    }
}

/// The public request for these CLI arguments.
pub fn request_from_args(args: &GenerateArgs) -> pb::GenerateRequest {
    let input = if args.chat {
        pb::generate_request::Input::Messages(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
        })
    } else {
        pb::generate_request::Input::Prompt(args.prompt.clone())
    };
    pb::GenerateRequest {
        input: Some(input),
        sampling: Some(pb::SamplingParams {
            temperature: Some(args.temperature),
            top_p: Some(args.top_p),
            top_k: Some(args.top_k as i32),
            repetition_penalty: Some(args.repetition_penalty),
            seed: args.seed,
        }),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: Some(args.max_new_tokens as i32),
            stop: args.stop.clone(),
            ignore_eos: args.ignore_eos,
            ..Default::default()
        }),
        echo_prompt_token_ids: true,
        speculation: speculation_to_proto(args.speculation) as i32,
        ..Default::default()
    }
}

/// Streams one request; `on_text` sees each text delta.
pub async fn generate_remote(
    client: &mut GenerationClient<tonic::transport::Channel>,
    request: pb::GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<RemoteGeneration, tonic::Status> {
    let start = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let mut out = RemoteGeneration::default();
    while let Some(resp) = stream.message().await? {
        if out.token_ids.is_empty() && !resp.token_ids.is_empty() {
            out.first_token_seconds = start.elapsed().as_secs_f64();
        }
        out.prompt_token_ids.extend(resp.prompt_token_ids);
        out.token_ids.extend(resp.token_ids);
        if !resp.text.is_empty() {
            on_text(&resp.text);
            out.text.push_str(&resp.text);
        }
        if resp.speculation.is_some() {
            out.speculation = resp.speculation;
        }
        if resp.finish_reason != 0 {
            out.finish_reason = finish_reason_str(resp.finish_reason).to_string();
        }
    }
    out.total_seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

pub fn run(args: GenerateArgs, server: String) -> Result<()> {
    use std::io::Write;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut client = GenerationClient::connect(server.clone())
            .await
            .with_context(|| format!("cannot connect to {server}"))?;
        let json = args.json;
        let mut stdout = std::io::stdout().lock();
        let out = generate_remote(&mut client, request_from_args(&args), |delta| {
            if !json {
                let _ = stdout.write_all(delta.as_bytes());
                let _ = stdout.flush();
            }
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
        if json {
            let line = serde_json::to_string(&JsonOutput {
                prompt_token_ids: &out.prompt_token_ids,
                token_ids: &out.token_ids,
                text: &out.text,
                finish_reason: &out.finish_reason,
                tokens_per_second: out.tokens_per_second(),
                speculation: out.speculation.map(|s| SpecJson {
                    steps: s.steps as usize,
                    verified_tokens: s.verified_tokens as usize,
                    accepted_tokens: s.accepted_tokens as usize,
                    mean_acceptance_length: s.mean_acceptance_length as f64,
                    tier_steps: s.tier_steps.iter().map(|&n| n as usize).collect(),
                }),
            })?;
            writeln!(stdout, "{line}")?;
        } else {
            writeln!(stdout)?;
            eprintln!(
                "[{} tokens, {:.1} tok/s, first token after {:.3} s; finish: {}]",
                out.token_ids.len(),
                out.tokens_per_second(),
                out.first_token_seconds,
                out.finish_reason
            );
        }
        Ok(())
    })
}

pub fn speculation_to_proto(mode: SpecMode) -> pb::SpeculationMode {
    match mode {
        SpecMode::Auto => pb::SpeculationMode::Auto,
        SpecMode::Off => pb::SpeculationMode::Off,
        SpecMode::Fixed => pb::SpeculationMode::Fixed,
        SpecMode::Hetero => pb::SpeculationMode::Hetero,
    }
}
