//! `heterospec.v1.GenerateResponse`s turned into OpenAI's objects: whole
//! completions, stream chunks, usage, logprobs, errors.
//!
//! Invariant: the text and tokens of the chunks of one stream add up to the
//! non-streamed reply of the same request (each chunk carries exactly the
//! text and tokens of the responses it was made from).

use heterospec_proto::v1 as pb;
use serde_json::{json, Value};

use crate::tokenizer::TextTokenizer;

use super::wire::ReplyOptions;

/// Which endpoint's shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// What one reply is: its id, the model, the creation time and the
/// endpoint's shapes.
#[derive(Debug, Clone)]
pub struct Reply {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub options: ReplyOptions,
}

pub fn finish_reason(code: i32) -> Value {
    match pb::FinishReason::try_from(code) {
        Ok(pb::FinishReason::Length) => "length".into(),
        Ok(pb::FinishReason::Eos | pb::FinishReason::Stop) => "stop".into(),
        Ok(pb::FinishReason::Cancelled) => "abort".into(),
        _ => Value::Null,
    }
}

pub fn usage(u: &pb::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

pub fn speculation(s: &pb::SpeculationStats) -> Value {
    json!({
        "steps": s.steps,
        "verified_tokens": s.verified_tokens,
        "accepted_tokens": s.accepted_tokens,
        "mean_acceptance_length": s.mean_acceptance_length,
        "tier_steps": s.tier_steps,
    })
}

/// One token's bytes, and its text (lossy where the token is part of a
/// character).
fn token_text(tok: &TextTokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

impl Reply {
    /// The logprobs of the tokens of `r` in the endpoint's shape; `text_offset`
    /// (completions) counts from `offset`.
    fn logprobs(&self, tok: &TextTokenizer, r: &pb::GenerateResponse, offset: &mut usize) -> Value {
        if self.options.logprobs.is_none() {
            return Value::Null;
        }
        let alternatives = |i: usize| -> Vec<(String, Vec<u8>, f32)> {
            r.top_logprobs
                .get(i)
                .map(|t| {
                    t.token_ids
                        .iter()
                        .zip(&t.logprobs)
                        .map(|(&id, &lp)| {
                            let (s, b) = token_text(tok, id);
                            (s, b, lp)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = r
                    .token_ids
                    .iter()
                    .zip(&r.logprobs)
                    .enumerate()
                    .map(|(i, (&id, &lp))| {
                        let (text, bytes) = token_text(tok, id);
                        let top: Vec<Value> = alternatives(i)
                            .into_iter()
                            .map(|(t, b, lp)| json!({"token": t, "logprob": lp, "bytes": b}))
                            .collect();
                        json!({"token": text, "logprob": lp, "bytes": bytes, "top_logprobs": top})
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Completion => {
                let (mut tokens, mut offsets, mut tops) = (Vec::new(), Vec::new(), Vec::new());
                for (i, &id) in r.token_ids.iter().enumerate() {
                    let (text, _) = token_text(tok, id);
                    offsets.push(*offset);
                    *offset += text.len();
                    tokens.push(text);
                    let top: serde_json::Map<String, Value> =
                        alternatives(i).into_iter().map(|(t, _, lp)| (t, json!(lp))).collect();
                    tops.push(Value::Object(top));
                }
                json!({
                    "tokens": tokens,
                    "token_logprobs": r.logprobs,
                    "top_logprobs": tops,
                    "text_offset": offsets,
                })
            }
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// The whole reply from all of a request's responses.
    pub fn whole(&self, tok: &TextTokenizer, responses: &[pb::GenerateResponse]) -> Value {
        let text: String = responses.iter().map(|r| r.text.as_str()).collect();
        let last = responses.last();
        let mut merged = pb::GenerateResponse::default();
        for r in responses {
            merged.token_ids.extend(&r.token_ids);
            merged.logprobs.extend(&r.logprobs);
            merged.top_logprobs.extend(r.top_logprobs.iter().cloned());
        }
        let logprobs = self.logprobs(tok, &merged, &mut 0);
        let finish = last.map_or(Value::Null, |r| finish_reason(r.finish_reason));
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        };
        let mut out = json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let Some(u) = last.and_then(|r| r.usage.as_ref()) {
            out["usage"] = usage(u);
        }
        if let Some(s) = last.and_then(|r| r.speculation.as_ref()) {
            out["speculation"] = speculation(s);
        }
        out
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        let mut out = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.options.include_usage {
            out["usage"] = Value::Null;
        }
        out
    }

    /// The chat stream's first chunk: the assistant's role.
    pub fn role_chunk(&self) -> Option<Value> {
        (self.kind == Kind::Chat).then(|| {
            self.chunk(vec![json!({
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            })])
        })
    }

    /// The chunks of one response: its text (and logprobs), and on the
    /// last one the finish reason, the speculation stats and (when asked)
    /// a usage chunk after it.
    pub fn chunks(&self, tok: &TextTokenizer, r: &pb::GenerateResponse, offset: &mut usize) -> Vec<Value> {
        let finish = finish_reason(r.finish_reason);
        let logprobs = self.logprobs(tok, r, offset);
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "delta": {"content": r.text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": r.text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        };
        let mut first = self.chunk(vec![choice]);
        if let Some(s) = &r.speculation {
            first["speculation"] = speculation(s);
        }
        let mut out = vec![first];
        if let (true, Some(u)) = (self.options.include_usage, &r.usage) {
            let mut last = self.chunk(Vec::new());
            last["usage"] = usage(u);
            out.push(last);
        }
        out
    }
}
