//! Text <-> token ids for a GGUF model: the byte-level BPE or
//! SentencePiece-style tokenizer, the special tokens and the chat template,
//! all from the GGUF metadata (the template from the model's family, or a
//! file, where the GGUF has none).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{ModelWrapper, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Result, RouterError};

mod chat;
mod spm;

pub use chat::ChatMessage;

/// `tokenizer.ggml.pre` of the Llama 3 family (its split, whole-word
/// lookups, BOS by default).
const LLAMA3_PRE: &[&str] = &["llama-bpe", "llama3", "llama-v3", "falcon3"];
/// Qwen2's split.
const QWEN2_PRE: &[&str] = &["qwen2", "deepseek-r1-qwen", "megrez"];
/// Llama 3's split with plain merges.
const OTHER_LLAMA3_SPLIT: &[&str] = &["smaug-bpe", "dbrx"];

/// The model's tokenizer plus what generation needs to know about it.
pub struct TextTokenizer {
    inner: Tokenizer,
    eos_token_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos: Option<u32>,
    chat_template: Option<String>,
    max_context: Option<usize>,
    /// Byte-level BPE (GGUF `tokenizer.ggml.model` = `gpt2`): each piece's
    /// characters stand for bytes.
    byte_level: bool,
}

/// The byte a character of a byte-level BPE piece stands for (GPT-2's
/// table: printable Latin-1 bytes are themselves, the other 68 bytes are
/// U+0100 onwards in order).
fn byte_of_piece_char(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let c = c as u32;
    if printable(c) {
        return Some(c as u8);
    }
    let n = c.checked_sub(0x100)?;
    (0u32..=0xff)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

impl TextTokenizer {
    /// Reads only the GGUF header (metadata), not the weights.
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| RouterError::Tokenizer(format!("cannot open {}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut BufReader::new(file))
            .map_err(|e| RouterError::Tokenizer(format!("{} is not a valid GGUF file: {e}", path.display())))?;
        Self::from_gguf(&content)
    }

    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let meta_str = |key: &str| content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
        let meta_u32 = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let model = meta_str("tokenizer.ggml.model");
        let spm = model.as_deref() == Some("llama");
        let mut inner = match model.as_deref() {
            Some("llama") => spm::from_gguf(content)?,
            Some("gpt2") => Tokenizer::from_gguf(content).map_err(|e| RouterError::Tokenizer(e.to_string()))?,
            other => {
                return Err(RouterError::Tokenizer(format!(
                    "tokenizer.ggml.model {other:?} is not supported (gpt2, llama)"
                )))
            }
        };
        // Pre-tokenizers as llama.cpp applies them (its `tokenizer.ggml.pre`
        // names); without a leading-space insertion. SentencePiece-style
        // tokenizers split nothing before merging.
        let pre = meta_str("tokenizer.ggml.pre");
        match pre.as_deref() {
            _ if spm => {}
            Some("smollm") => {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            Some("gpt2") | Some("gpt-2") | Some("default") | None => {
                inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
            // Llama 3's and Qwen2/3's splits as llama.cpp names them: digits
            // in runs of up to three, or one by one; no normalization; the
            // Llama 3 family emits a word the vocabulary holds whole.
            Some(pre)
                if [LLAMA3_PRE, QWEN2_PRE, OTHER_LLAMA3_SPLIT]
                    .iter()
                    .any(|f| f.contains(&pre)) =>
            {
                let digits = if QWEN2_PRE.contains(&pre) {
                    r"\p{N}"
                } else {
                    r"\p{N}{1,3}"
                };
                let pattern = format!(
                    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                );
                let split = Split::new(SplitPattern::Regex(pattern), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| RouterError::Tokenizer(e.to_string()))?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])));
                inner
                    .with_normalizer(None::<NormalizerWrapper>)
                    .map_err(|e| RouterError::Tokenizer(e.to_string()))?;
                if LLAMA3_PRE.contains(&pre) {
                    if let ModelWrapper::BPE(bpe) = inner.get_model() {
                        let mut bpe = bpe.clone();
                        bpe.ignore_merges = true;
                        inner.with_model(bpe);
                    }
                }
            }
            Some(other) => {
                return Err(RouterError::Tokenizer(format!(
                    "tokenizer.ggml.pre `{other}` is not supported (smollm, gpt2, llama-bpe, qwen2 and their aliases)"
                )))
            }
        }
        let tokens = content
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| RouterError::Tokenizer("GGUF has no tokenizer.ggml.tokens".into()))?;
        let token_text = |id: u32| tokens.get(id as usize).and_then(|v| v.to_string().ok()).cloned();

        let eos = meta_u32("tokenizer.ggml.eos_token_id");
        let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
        // Chat models also end a turn with their end-of-turn token; these
        // end generation in llama.cpp too (its end-of-generation tokens).
        for name in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|end_of_text|>",
            "<|endoftext|>",
            "<|end|>",
            "<end_of_turn>",
            "<EOT>",
        ] {
            if let Some(id) = inner.token_to_id(name) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let bos = meta_u32("tokenizer.ggml.bos_token_id");
        // As llama.cpp: the Llama 3 family starts with BOS unless the file
        // says otherwise.
        let llama3 = pre.is_some_and(|p| LLAMA3_PRE.contains(&p.as_str()));
        let add_bos = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(llama3);
        // `from_gguf` installs a BOS-adding post-processor when the file asks
        // for it; we add BOS ourselves so that chat templates which already
        // start with it do not get two.
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        Ok(TextTokenizer {
            inner,
            eos_token_ids,
            bos_token: bos.and_then(token_text),
            eos_token: eos.and_then(token_text),
            add_bos: if add_bos { bos } else { None },
            chat_template: meta_str("tokenizer.chat_template")
                .inspect(|t| {
                    if let Err(e) = chat::check(t) {
                        tracing::warn!(error = %e, "the model's chat template does not parse: chat requests will fail");
                    }
                })
                .or_else(|| {
                    let arch = meta_str("general.architecture").unwrap_or_default();
                    let (family, template) = chat::family_template(&arch)?;
                    tracing::info!(family, "the model has no chat template: using its family's");
                    Some(template.to_string())
                }),
            max_context: meta_str("general.architecture")
                .and_then(|arch| meta_u32(&format!("{arch}.context_length")))
                .map(|n| n as usize),
            byte_level: meta_str("tokenizer.ggml.model").as_deref() == Some("gpt2"),
        })
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The model's context length from the GGUF metadata, if it says.
    pub fn max_context(&self) -> Option<usize> {
        self.max_context
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids that end generation (unless `ignore_eos`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Encodes text; special-token markup in the text (e.g. `<|im_start|>`)
    /// becomes the special tokens, as in a rendered chat template.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| RouterError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let Some(bos) = self.add_bos {
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| RouterError::Tokenizer(e.to_string()))
    }

    /// The bytes token `id` stands for: a byte-level piece's bytes, a
    /// byte-fallback token's (`<0xE2>`) byte, a SentencePiece piece with
    /// `▁` as a space, a special token's text (for logprobs, where a token
    /// may be part of a character).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if let Some(b) = piece
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            return vec![b];
        }
        if self.byte_level {
            if let Some(bytes) = piece.chars().map(byte_of_piece_char).collect::<Option<Vec<u8>>>() {
                return bytes;
            }
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }

    /// Renders messages with the model's chat template and a trailing
    /// assistant turn opener.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| RouterError::InvalidArgument {
                field: "messages",
                reason: "the model has no chat template (the server can be given one with --chat-template)".into(),
            })?;
        chat::render(
            template,
            messages,
            self.bos_token.as_deref().unwrap_or_default(),
            self.eos_token.as_deref().unwrap_or_default(),
        )
    }

    /// Uses the Jinja template in `file` (as in `tokenizer.chat_template`)
    /// instead of the model's own.
    pub fn set_chat_template_file(&mut self, file: &Path) -> Result<()> {
        let template = std::fs::read_to_string(file)
            .map_err(|e| RouterError::Tokenizer(format!("--chat-template {}: {e}", file.display())))?;
        chat::check(&template)
            .map_err(|e| RouterError::Tokenizer(format!("--chat-template {}: {e}", file.display())))?;
        tracing::info!(file = %file.display(), "chat template from --chat-template");
        self.chat_template = Some(template);
        Ok(())
    }

    /// [`TextTokenizer::from_gguf_file`] with the chat template read from
    /// `chat_template` where given.
    pub fn load(path: &Path, chat_template: Option<&Path>) -> Result<Self> {
        let mut tokenizer = Self::from_gguf_file(path)?;
        if let Some(file) = chat_template {
            tokenizer.set_chat_template_file(file)?;
        }
        Ok(tokenizer)
    }
}
