//! Chat templates: rendering a conversation with a Jinja template (as
//! Hugging Face's and llama.cpp's `tokenizer.chat_template`), and the known
//! templates of model families whose files may carry none (Gemma's base
//! models).
//!
//! Invariant: a template that does not parse is refused when it is set, not
//! when the first request uses it.

use serde::Serialize;

use crate::error::{Result, RouterError};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Gemma's turns, as llama.cpp writes them for a Gemma model without a
/// template: `<start_of_turn>user` / `model`, contents trimmed, a system
/// message put before the first turn's content; no BOS (the tokenizer adds
/// it).
const GEMMA: &str = concat!(
    "{%- if messages and messages[0].role == 'system' -%}",
    "{%- set prefix = (messages[0].content | trim) ~ '\\n\\n' -%}",
    "{%- set turns = messages[1:] -%}",
    "{%- else -%}",
    "{%- set prefix = '' -%}",
    "{%- set turns = messages -%}",
    "{%- endif -%}",
    "{%- for m in turns -%}",
    "{{- '<start_of_turn>' ~ ('model' if m.role == 'assistant' else m.role) ~ '\\n' -}}",
    "{{- (prefix if loop.first else '') ~ (m.content | trim) ~ '<end_of_turn>\\n' -}}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}",
);

/// The family and known template of `general.architecture` = `arch`.
pub(super) fn family_template(arch: &str) -> Option<(&'static str, &'static str)> {
    match arch {
        "gemma" | "gemma2" | "gemma3" => Some(("gemma", GEMMA)),
        _ => None,
    }
}

fn environment(template: &str) -> Result<minijinja::Environment<'_>> {
    let mut env = minijinja::Environment::new();
    // Python's string and list methods (`startswith`, `strip`, `split`,
    // ...), which real chat templates (Qwen3's) call.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| RouterError::Tokenizer(format!("chat template does not parse: {e}")))?;
    Ok(env)
}

/// Refuses a template that does not parse.
pub(super) fn check(template: &str) -> Result<()> {
    environment(template).map(drop)
}

/// `messages` rendered with `template` and a trailing assistant turn opener.
pub(super) fn render(template: &str, messages: &[ChatMessage], bos_token: &str, eos_token: &str) -> Result<String> {
    environment(template)?
        .get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        })
        .map_err(|e| RouterError::InvalidArgument {
            field: "messages",
            reason: format!("chat template failed: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemmas_template_writes_its_turns_as_llama_cpp_does() {
        let (_, gemma) = family_template("gemma3").unwrap();
        let messages = [
            ChatMessage::new("system", " Be brief. "),
            ChatMessage::new("user", "Hi there\n"),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Name a colour."),
        ];
        assert_eq!(
            render(gemma, &messages, "<bos>", "<eos>").unwrap(),
            "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nName a colour.<end_of_turn>\n\
             <start_of_turn>model\n"
        );
        assert_eq!(
            render(gemma, &messages[1..2], "<bos>", "<eos>").unwrap(),
            "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
        );
        assert!(family_template("llama").is_none());
        assert!(check("{% for %}").is_err());
    }
}
