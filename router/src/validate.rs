//! Turns a public `GenerateRequest` into a checked, tokenized request. Every
//! rejection names the offending field.

use heterospec_proto::engine::v1 as engine_pb;
use heterospec_proto::v1 as pb;

use crate::error::{Result, RouterError};
use crate::output::StopCriteria;
use crate::tokenizer::{ChatMessage, TextTokenizer};

/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 128;
/// Stop strings per request: each is searched after every token.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes (it bounds the text held back).
pub const MAX_STOP_STRING_BYTES: usize = 256;
/// Most alternatives per token `top_logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Longest request id / cache salt, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Limits that depend on the model.
#[derive(Debug, Clone, Copy)]
pub struct ModelLimits {
    /// Tokens of prompt plus output per request: the model's context, or
    /// less when `--max-total-tokens` says so.
    pub max_context: usize,
    pub vocab_size: usize,
    /// `max_context` comes from `--max-total-tokens`.
    pub capped: bool,
}

impl ModelLimits {
    /// The model's context, or `max_total_tokens` where that is smaller.
    pub fn new(model_context: usize, vocab_size: usize, max_total_tokens: Option<usize>) -> Self {
        match max_total_tokens {
            Some(cap) if cap < model_context => ModelLimits {
                max_context: cap,
                vocab_size,
                capped: true,
            },
            _ => ModelLimits {
                max_context: model_context,
                vocab_size,
                capped: false,
            },
        }
    }

    /// What bounds a request's tokens, for error messages.
    fn context(&self) -> String {
        if self.capped {
            format!("the limit of {} tokens (--max-total-tokens)", self.max_context)
        } else {
            format!("the model's context of {} tokens", self.max_context)
        }
    }
}

/// A request that passed validation, ready to schedule.
#[derive(Debug, Clone)]
pub struct ValidatedRequest {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: engine_pb::Sampling,
    pub criteria: StopCriteria,
    pub logprobs: bool,
    pub cache_salt: Option<String>,
    pub speculation: pb::SpeculationMode,
    pub echo_prompt_token_ids: bool,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

pub fn validate(req: pb::GenerateRequest, tokenizer: &TextTokenizer, limits: ModelLimits) -> Result<ValidatedRequest> {
    if req.request_id.len() > MAX_ID_BYTES {
        return Err(invalid("request_id", format!("longer than {MAX_ID_BYTES} bytes")));
    }
    if req.cache_salt.len() > MAX_ID_BYTES {
        return Err(invalid("cache_salt", format!("longer than {MAX_ID_BYTES} bytes")));
    }
    let speculation = pb::SpeculationMode::try_from(req.speculation)
        .map_err(|_| invalid("speculation", format!("unknown mode {}", req.speculation)))?;

    let prompt_token_ids = match req.input {
        None => {
            return Err(invalid(
                "input",
                "one of prompt, prompt_token_ids or messages is required",
            ))
        }
        Some(pb::generate_request::Input::Prompt(text)) => {
            if text.is_empty() {
                return Err(invalid("prompt", "must not be empty"));
            }
            tokenizer.encode(&text)?
        }
        Some(pb::generate_request::Input::PromptTokenIds(ids)) => {
            if ids.ids.is_empty() {
                return Err(invalid("prompt_token_ids", "must not be empty"));
            }
            if let Some(bad) = ids.ids.iter().find(|&&id| id as usize >= limits.vocab_size) {
                return Err(invalid(
                    "prompt_token_ids",
                    format!("token id {bad} is outside the vocabulary of {}", limits.vocab_size),
                ));
            }
            ids.ids
        }
        Some(pb::generate_request::Input::Messages(m)) => {
            if m.messages.is_empty() {
                return Err(invalid("messages", "must not be empty"));
            }
            if let Some(bad) = m
                .messages
                .iter()
                .find(|m| !["system", "user", "assistant"].contains(&m.role.as_str()))
            {
                return Err(invalid(
                    "messages",
                    format!("unknown role `{}` (system, user, assistant)", bad.role),
                ));
            }
            let messages: Vec<ChatMessage> = m
                .messages
                .into_iter()
                .map(|m| ChatMessage::new(m.role, m.content))
                .collect();
            tokenizer.encode(&tokenizer.apply_chat_template(&messages)?)?
        }
    };
    if prompt_token_ids.is_empty() {
        return Err(invalid("prompt", "encodes to no tokens"));
    }
    if prompt_token_ids.len() >= limits.max_context {
        return Err(invalid(
            "prompt",
            format!(
                "{} tokens leave no room in {}",
                prompt_token_ids.len(),
                limits.context()
            ),
        ));
    }

    let s = req.sampling.unwrap_or_default();
    let temperature = s.temperature.unwrap_or(0.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(invalid(
            "temperature",
            format!("must be a finite number >= 0, got {temperature}"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid("top_p", format!("must be in (0, 1], got {top_p}")));
    }
    let top_k = s.top_k.unwrap_or(0);
    if top_k < 0 {
        return Err(invalid("top_k", format!("must be >= 0, got {top_k}")));
    }
    let repetition_penalty = s.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(invalid(
            "repetition_penalty",
            format!("must be > 0, got {repetition_penalty}"),
        ));
    }

    if req.top_logprobs > 0 && !req.logprobs {
        return Err(invalid("top_logprobs", "needs logprobs"));
    }
    if req.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(invalid(
            "top_logprobs",
            format!("must be at most {MAX_TOP_LOGPROBS}, got {}", req.top_logprobs),
        ));
    }

    let stopping = req.stopping.unwrap_or_default();
    let room = limits.max_context - prompt_token_ids.len();
    let max_new_tokens = match stopping.max_new_tokens {
        None if stopping.fill_context => room,
        None => DEFAULT_MAX_NEW_TOKENS.min(room),
        Some(n) if n < 1 => return Err(invalid("max_new_tokens", format!("must be >= 1, got {n}"))),
        Some(n) if n as usize > room => {
            return Err(invalid(
                "max_new_tokens",
                format!(
                    "{n} plus the prompt's {} tokens exceeds {}",
                    prompt_token_ids.len(),
                    limits.context()
                ),
            ))
        }
        Some(n) => n as usize,
    };
    if stopping.stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stopping.stop.len()),
        ));
    }
    if stopping.stop.iter().any(String::is_empty) {
        return Err(invalid("stop", "stop strings must not be empty"));
    }
    if stopping.stop.iter().any(|s| s.len() > MAX_STOP_STRING_BYTES) {
        return Err(invalid(
            "stop",
            format!("stop strings must be at most {MAX_STOP_STRING_BYTES} bytes"),
        ));
    }

    Ok(ValidatedRequest {
        request_id: req.request_id,
        prompt_token_ids,
        sampling: engine_pb::Sampling {
            temperature,
            top_k: top_k as u32,
            top_p,
            repetition_penalty,
            seed: s.seed,
            top_logprobs: req.top_logprobs,
        },
        criteria: StopCriteria {
            max_new_tokens,
            stop: stopping.stop,
            ignore_eos: stopping.ignore_eos,
        },
        logprobs: req.logprobs,
        cache_salt: (!req.cache_salt.is_empty()).then_some(req.cache_salt),
        speculation,
        echo_prompt_token_ids: req.echo_prompt_token_ids,
    })
}
