//! OpenAI's request bodies (`/v1/chat/completions`, `/v1/completions`)
//! turned into a `heterospec.v1.GenerateRequest`.
//!
//! Invariant: every OpenAI field is honoured or, when set to something this
//! server cannot do (`n` > 1, tools, penalties, `logit_bias`, ...), refused
//! with a message naming it; fields OpenAI does not define are ignored (as
//! vLLM does), and `null` means absent. Defaults are OpenAI's where they
//! differ from the gRPC API's: `temperature` 1, and without `max_tokens` a
//! chat reply may run to the end of the context (`/v1/completions`: 16
//! tokens).

use std::collections::HashMap;

use heterospec_proto::v1 as pb;
use serde::Deserialize;
use serde_json::Value;

use crate::error::RouterError;

use crate::validate::MAX_TOP_LOGPROBS;

fn invalid(field: &'static str, reason: impl Into<String>) -> RouterError {
    RouterError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share (read from the same body as the
/// endpoint's own, so that an error names its field).
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub user: Option<String>,
    /// Extensions (vLLM's names): `top_k`, `repetition_penalty`,
    /// `ignore_eos`; and heterospec's `speculation` (`auto`, `off`,
    /// `fixed`, `hetero`).
    pub top_k: Option<i32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub speculation: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Vec<Value>>,
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// The number of alternatives per token (0: the chosen token's only).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
}

/// What the reply needs besides the engine's responses.
#[derive(Debug, Clone, Copy)]
pub struct ReplyOptions {
    pub stream: bool,
    pub include_usage: bool,
    /// Per-token logprobs, with this many alternatives each.
    pub logprobs: Option<u32>,
}

fn speculation(name: Option<&str>) -> Result<pb::SpeculationMode, RouterError> {
    Ok(match name.map(str::to_ascii_lowercase).as_deref() {
        None | Some("auto") => pb::SpeculationMode::Auto,
        Some("off") => pb::SpeculationMode::Off,
        Some("fixed") => pb::SpeculationMode::Fixed,
        Some("hetero") => pb::SpeculationMode::Hetero,
        Some(other) => {
            return Err(invalid(
                "speculation",
                format!("unknown mode `{other}` (auto, off, fixed, hetero)"),
            ))
        }
    })
}

impl Common {
    /// The shared fields into `req` (checked here where OpenAI's rules
    /// differ from the gRPC API's; the rest by `validate`).
    fn apply(
        self,
        served_model: &str,
        max_tokens: Option<i64>,
        req: &mut pb::GenerateRequest,
    ) -> Result<ReplyOptions, RouterError> {
        if let Some(model) = &self.model {
            if model != served_model {
                return Err(RouterError::ModelNotFound {
                    asked: model.clone(),
                    served: served_model.to_string(),
                });
            }
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(invalid("n", "only n = 1 is supported"));
        }
        for (field, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(invalid(field, "is not supported (use repetition_penalty)"));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(invalid("logit_bias", "is not supported"));
        }
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(invalid("stream_options", "is only allowed with stream = true"));
        }
        let max_new_tokens = match max_tokens {
            None => None,
            Some(n) if !(1..=i32::MAX as i64).contains(&n) => {
                return Err(invalid("max_tokens", format!("must be >= 1, got {n}")))
            }
            Some(n) => Some(n as i32),
        };
        req.sampling = Some(pb::SamplingParams {
            temperature: Some(self.temperature.unwrap_or(1.0)),
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed.map(|s| s as u64),
        });
        req.stopping = Some(pb::StoppingCriteria {
            max_new_tokens,
            stop: match self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(v)) => v,
            },
            ignore_eos: self.ignore_eos.unwrap_or(false),
            // OpenAI's default: up to the context's end.
            fill_context: max_new_tokens.is_none(),
        });
        req.speculation = speculation(self.speculation.as_deref())? as i32;
        Ok(ReplyOptions {
            stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            logprobs: None,
        })
    }
}

fn top_count(field: &'static str, n: u32) -> Result<u32, RouterError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(invalid(field, format!("must be at most {MAX_TOP_LOGPROBS}, got {n}")));
    }
    Ok(n)
}

impl ChatRequest {
    pub fn into_generate(
        self,
        common: Common,
        served_model: &str,
    ) -> Result<(pb::GenerateRequest, ReplyOptions), RouterError> {
        for (field, set) in [
            ("tools", self.tools.as_ref().is_some_and(|t| !t.is_empty())),
            ("functions", self.functions.as_ref().is_some_and(|t| !t.is_empty())),
            ("tool_choice", self.tool_choice.as_ref().is_some_and(|c| *c != "none")),
        ] {
            if set {
                return Err(invalid(field, "tool calls are not supported"));
            }
        }
        if let Some(format) = &self.response_format {
            if format.get("type").and_then(Value::as_str) != Some("text") {
                return Err(invalid("response_format", "only {\"type\": \"text\"} is supported"));
            }
        }
        let logprobs = self.logprobs.unwrap_or(false);
        if self.top_logprobs.is_some_and(|n| n > 0) && !logprobs {
            return Err(invalid("top_logprobs", "needs logprobs = true"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for m in self.messages {
            let role = match m.role.as_str() {
                "developer" => "system".to_string(),
                "system" | "user" | "assistant" => m.role,
                other => {
                    return Err(invalid(
                        "messages",
                        format!("role `{other}` is not supported (system, developer, user, assistant)"),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(invalid(
                                    "messages",
                                    format!("content parts of type `{kind}` are not supported (text)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            messages.push(pb::ChatMessage { role, content });
        }
        let mut req = pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Messages(pb::ChatMessages { messages })),
            logprobs,
            ..Default::default()
        };
        let max_tokens = self.max_completion_tokens.or(common.max_tokens);
        let mut options = common.apply(served_model, max_tokens, &mut req)?;
        if logprobs {
            let n = top_count("top_logprobs", self.top_logprobs.unwrap_or(0))?;
            req.top_logprobs = n;
            options.logprobs = Some(n);
        }
        Ok((req, options))
    }
}

impl CompletionRequest {
    pub fn into_generate(
        self,
        common: Common,
        served_model: &str,
    ) -> Result<(pb::GenerateRequest, ReplyOptions), RouterError> {
        if self.echo == Some(true) {
            return Err(invalid("echo", "is not supported"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(invalid("suffix", "is not supported"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(invalid("best_of", "only best_of = 1 is supported"));
        }
        let input = match self.prompt {
            Prompt::Text(t) => pb::generate_request::Input::Prompt(t),
            Prompt::Texts(mut v) if v.len() == 1 => pb::generate_request::Input::Prompt(v.remove(0)),
            Prompt::Ids(ids) => pb::generate_request::Input::PromptTokenIds(pb::TokenIds { ids }),
            Prompt::IdLists(mut v) if v.len() == 1 => {
                pb::generate_request::Input::PromptTokenIds(pb::TokenIds { ids: v.remove(0) })
            }
            _ => return Err(invalid("prompt", "one prompt per request")),
        };
        let mut req = pb::GenerateRequest {
            input: Some(input),
            logprobs: self.logprobs.is_some(),
            ..Default::default()
        };
        // The legacy endpoint's default is 16 tokens.
        let max_tokens = Some(common.max_tokens.unwrap_or(16));
        let mut options = common.apply(served_model, max_tokens, &mut req)?;
        if let Some(n) = self.logprobs {
            let n = top_count("logprobs", n)?;
            req.top_logprobs = n;
            options.logprobs = Some(n);
        }
        Ok((req, options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<(pb::GenerateRequest, ReplyOptions), RouterError> {
        let common = serde_json::from_value::<Common>(body.clone()).unwrap();
        serde_json::from_value::<ChatRequest>(body)
            .unwrap()
            .into_generate(common, "m")
    }

    fn completion(body: Value) -> Result<(pb::GenerateRequest, ReplyOptions), RouterError> {
        let common = serde_json::from_value::<Common>(body.clone()).unwrap();
        serde_json::from_value::<CompletionRequest>(body)
            .unwrap()
            .into_generate(common, "m")
    }

    fn field(r: Result<(pb::GenerateRequest, ReplyOptions), RouterError>) -> &'static str {
        match r {
            Err(RouterError::InvalidArgument { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_chat_request_maps_field_by_field() {
        let (req, opts) = chat(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
            ],
            "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5,
            "stop": "\n", "seed": 3, "stream": true, "stream_options": {"include_usage": true},
            "logprobs": true, "top_logprobs": 2, "speculation": "off", "some_other_field": 1
        }))
        .unwrap();
        let Some(pb::generate_request::Input::Messages(m)) = &req.input else {
            panic!()
        };
        assert_eq!(m.messages[0].role, "system");
        assert_eq!(m.messages[1].content, "Hi there");
        let s = req.sampling.unwrap();
        assert_eq!((s.temperature, s.top_p, s.seed), (Some(0.0), Some(0.5), Some(3)));
        let stop = req.stopping.unwrap();
        assert_eq!((stop.max_new_tokens, stop.stop), (Some(7), vec!["\n".to_string()]));
        assert!(!stop.fill_context);
        assert_eq!(req.speculation, pb::SpeculationMode::Off as i32);
        assert!(req.logprobs && req.top_logprobs == 2);
        assert!(opts.stream && opts.include_usage && opts.logprobs == Some(2));
    }

    #[test]
    fn openai_defaults_apply_when_fields_are_absent() {
        let (req, opts) = chat(serde_json::json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!(req.sampling.unwrap().temperature, Some(1.0));
        let stopping = req.stopping.unwrap();
        assert_eq!((stopping.max_new_tokens, stopping.fill_context), (None, true));
        assert_eq!(req.speculation, pb::SpeculationMode::Auto as i32);
        assert!(!opts.stream && opts.logprobs.is_none() && !req.logprobs);
        let (req, _) = completion(serde_json::json!({"prompt": "x"})).unwrap();
        assert_eq!(req.stopping.unwrap().max_new_tokens, Some(16));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let user = serde_json::json!([{"role": "user", "content": "x"}]);
        let with = |k: &str, v: Value| {
            let mut body = serde_json::json!({"messages": user});
            body[k] = v;
            chat(body)
        };
        assert_eq!(field(with("n", 2.into())), "n");
        assert!(matches!(
            with("model", "other".into()),
            Err(RouterError::ModelNotFound { .. })
        ));
        assert_eq!(field(with("presence_penalty", 0.5.into())), "presence_penalty");
        assert_eq!(field(with("logit_bias", serde_json::json!({"1": 2}))), "logit_bias");
        assert_eq!(field(with("tools", serde_json::json!([{"type": "function"}]))), "tools");
        assert_eq!(field(with("max_tokens", 0.into())), "max_tokens");
        assert_eq!(field(with("stream_options", serde_json::json!({}))), "stream_options");
        assert_eq!(field(with("top_logprobs", 2.into())), "top_logprobs");
        // `null` is absent.
        for k in ["stream", "logprobs", "top_logprobs", "ignore_eos", "max_tokens", "stop"] {
            assert!(with(k, Value::Null).is_ok(), "{k}: null");
        }
        assert_eq!(field(with("speculation", "sometimes".into())), "speculation");
        assert_eq!(
            field(with("response_format", serde_json::json!({"type": "json_object"}))),
            "response_format"
        );
        let mut body = serde_json::json!({"messages": [{"role": "tool", "content": "x"}]});
        assert_eq!(field(chat(body.clone())), "messages");
        body["messages"] = serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]);
        assert_eq!(field(chat(body)), "messages");
        let c = completion;
        assert_eq!(field(c(serde_json::json!({"prompt": ["a", "b"]}))), "prompt");
        assert_eq!(field(c(serde_json::json!({"prompt": "a", "echo": true}))), "echo");
        assert_eq!(field(c(serde_json::json!({"prompt": "a", "logprobs": 21}))), "logprobs");
        assert_eq!(field(c(serde_json::json!({"prompt": "a", "best_of": 2}))), "best_of");
    }
}
