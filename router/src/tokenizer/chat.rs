//! Chat templates: rendering a conversation with a Jinja template (as
//! Hugging Face's and llama.cpp's `tokenizer.chat_template`), and the known
//! templates of model families whose files may carry none (Gemma's base
//! models).
//!
//! Invariant: a `--chat-template` that does not parse is refused at
//! start-up; a GGUF's own that does not parse is reported in the log at
//! load, and to every chat request.

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

/// Gemma's turns, as llama.cpp's built-in `gemma` template writes them:
/// `<start_of_turn>user` / `model`, contents trimmed, system messages
/// (trimmed, joined) put before the next user turn's content; no BOS (the
/// tokenizer adds it).
const GEMMA: &str = concat!(
    "{%- set ns = namespace(system='') -%}",
    "{%- for m in messages -%}",
    "{%- if m.role == 'system' -%}",
    "{%- set ns.system = ns.system ~ (m.content | trim) -%}",
    "{%- else -%}",
    "{%- set role = 'model' if m.role == 'assistant' else m.role -%}",
    "{{- '<start_of_turn>' ~ role ~ '\\n' -}}",
    "{%- if ns.system and role != 'model' -%}",
    "{{- ns.system ~ '\\n\\n' -}}",
    "{%- set ns.system = '' -%}",
    "{%- endif -%}",
    "{{- (m.content | trim) ~ '<end_of_turn>\\n' -}}",
    "{%- endif -%}",
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
            ChatMessage::new("system", "Use French."),
            ChatMessage::new("user", "Name a colour."),
        ];
        // llama.cpp's rendering (`router/tests/text.rs` checks it against
        // the golden file's).
        assert_eq!(
            render(gemma, &messages, "<bos>", "<eos>").unwrap(),
            "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nUse French.\n\nName a colour.<end_of_turn>\n\
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
