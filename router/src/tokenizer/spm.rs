//! SentencePiece-style tokenizers from GGUF metadata
//! (`tokenizer.ggml.model` = `llama`: Gemma, Llama 2, Mistral), built as
//! llama.cpp runs them: spaces become `▁` (with a leading one where the
//! file asks), adjacent pieces merge highest score first into pieces the
//! vocabulary holds, characters it does not hold fall back to byte tokens
//! (`<0xE2>`), and control and user-defined tokens are matched in the raw
//! text before any of that.
//!
//! Invariant: the merge order is the merged piece's score, as llama.cpp
//! ranks its bigrams (equal scores: the merged piece's id, then the left
//! piece's, where llama.cpp takes the leftmost bigram; the two agree on
//! every golden text); no merge produces a piece the vocabulary lacks; a
//! piece listed twice is its last id, as in llama.cpp's lookup.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use crate::error::{Result, RouterError};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

fn error(e: impl std::fmt::Display) -> RouterError {
    RouterError::Tokenizer(e.to_string())
}

fn array<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a Vec<gguf_file::Value>> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| error(format!("GGUF has no {key}")))
}

/// The tokenizer of a GGUF whose `tokenizer.ggml.model` is `llama`.
pub(super) fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer> {
    let tokens: Vec<String> = array(content, "tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned().map_err(error))
        .collect::<Result<_>>()?;
    let scores: Vec<f32> = array(content, "tokenizer.ggml.scores")?
        .iter()
        .map(|v| v.to_f32().map_err(error))
        .collect::<Result<_>>()?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(error)?
            .iter()
            .map(|t| t.to_i32().map_err(error))
            .collect::<Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(error(format!(
            "{} tokens but {} scores and {} token types",
            tokens.len(),
            scores.len(),
            types.len()
        )));
    }
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), id as u32);
    }
    let merges = merges_by_score(&tokens, &scores, &vocab);
    let unk = content
        .metadata
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|id| tokens.get(id as usize).cloned());
    let vocab: Vocab = vocab.into_iter().collect();
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk);
    }
    let mut tokenizer = Tokenizer::new(bpe.build().map_err(error)?);

    // llama.cpp's default for this model type is a leading space.
    let space_prefix = content
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(Replace::new(" ", "▁").map_err(error)?.into());
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(error)?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(error)?),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));

    // Control tokens are special (dropped when decoding); user-defined ones
    // are text. Both are matched in the raw text first, as llama.cpp does.
    let added = |ty: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == ty)
            .map(|(text, _)| AddedToken::from(text.clone(), special).normalized(false))
            .collect()
    };
    tokenizer.add_special_tokens(added(CONTROL, true)).map_err(error)?;
    tokenizer.add_tokens(added(USER_DEFINED, false)).map_err(error)?;
    Ok(tokenizer)
}

/// Every pair of pieces whose concatenation is a piece, ranked by that
/// piece's score (highest first; ties by the merged piece's id, then the
/// left piece's).
fn merges_by_score(tokens: &[String], scores: &[f32], vocab: &HashMap<String, u32>) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if vocab.get(piece) != Some(&(id as u32)) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(_)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((scores[id], id as u32, l, split));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked
        .into_iter()
        .map(|(_, id, _, split)| {
            let (l, r) = tokens[id as usize].split_at(split);
            (l.to_string(), r.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_the_merged_pieces_scores() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"].map(String::from).to_vec();
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges = merges_by_score(&tokens, &scores, &vocab);
        let pair = |l: &str, r: &str| (l.to_string(), r.to_string());
        assert_eq!(
            merges,
            [pair("b", "c"), pair("a", "b"), pair("a", "bc"), pair("ab", "c")]
        );
    }
}
