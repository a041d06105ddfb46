//! From committed token ids to streamed text: incremental detokenization
//! that never splits a UTF-8 character, stop strings (also across token
//! boundaries), EOS and the token limit.
//!
//! Text is held back while it could still be the start of a stop string, so
//! a stop string is never streamed to the client. The concatenated deltas of
//! a finished stream equal decoding all its ids at once, cut at the stop
//! string when one matched.

use crate::error::Result;
use crate::tokenizer::TextTokenizer;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Eos,
    Stop,
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// When to stop.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopCriteria {
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// Detokenizes one token at a time (the prefix/read-offset method): a
/// delta is emitted only when decoding the new tokens yields more text that
/// does not end in a replacement character (an incomplete UTF-8 sequence).
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes (often empty for the
    /// first bytes of a multi-byte character).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Text still pending at the end of the stream (an incomplete character
    /// comes out as a replacement character, as a full decode would give).
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// What one committed token produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutputDelta {
    pub text: String,
    pub finish_reason: Option<FinishReason>,
}

/// One request's output: counts tokens, detokenizes and checks stops.
pub struct OutputStream {
    criteria: StopCriteria,
    decoder: IncrementalDecoder,
    /// All text decoded so far (including held-back text).
    text: String,
    /// Bytes of `text` already emitted.
    emitted: usize,
    num_tokens: usize,
    finished: Option<FinishReason>,
}

impl OutputStream {
    pub fn new(criteria: StopCriteria) -> Self {
        OutputStream {
            criteria,
            decoder: IncrementalDecoder::new(),
            text: String::new(),
            emitted: 0,
            num_tokens: 0,
            finished: None,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Feeds one committed token. After a finish, further tokens are
    /// ignored (they came from a speculative run past the stop).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<OutputDelta> {
        if self.finished.is_some() {
            return Ok(OutputDelta::default());
        }
        self.num_tokens += 1;
        if !self.criteria.ignore_eos && tokenizer.eos_token_ids().contains(&id) {
            return self.finish(tokenizer, FinishReason::Eos);
        }
        let piece = self.decoder.push(tokenizer, id)?;
        let search_from = floor_char_boundary(&self.text, self.text.len().saturating_sub(self.max_stop_len()));
        self.text.push_str(&piece);
        if let Some(cut) = self.find_stop(search_from) {
            self.text.truncate(cut);
            self.finished = Some(FinishReason::Stop);
            return Ok(OutputDelta {
                text: self.take_until(cut),
                finish_reason: self.finished,
            });
        }
        if self.num_tokens >= self.criteria.max_new_tokens {
            return self.finish(tokenizer, FinishReason::Length);
        }
        let hold = self.held_back_len();
        Ok(OutputDelta {
            text: self.take_until(self.text.len() - hold),
            finish_reason: None,
        })
    }

    /// Ends the stream (EOS, length, or cancellation): flushes held text.
    pub fn finish(&mut self, tokenizer: &TextTokenizer, reason: FinishReason) -> Result<OutputDelta> {
        if self.finished.is_some() {
            return Ok(OutputDelta::default());
        }
        let rest = self.decoder.flush(tokenizer)?;
        let search_from = floor_char_boundary(&self.text, self.text.len().saturating_sub(self.max_stop_len()));
        self.text.push_str(&rest);
        let (end, reason) = match self.find_stop(search_from) {
            Some(cut) => (cut, FinishReason::Stop),
            None => (self.text.len(), reason),
        };
        self.text.truncate(end);
        self.finished = Some(reason);
        Ok(OutputDelta {
            text: self.take_until(end),
            finish_reason: Some(reason),
        })
    }

    fn max_stop_len(&self) -> usize {
        self.criteria.stop.iter().map(String::len).max().unwrap_or(0)
    }

    /// Byte offset of the earliest stop string that ends at or after `from`.
    fn find_stop(&self, from: usize) -> Option<usize> {
        self.criteria
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// Length of the longest suffix of the text that starts a stop string.
    fn held_back_len(&self) -> usize {
        let unsent = &self.text[self.emitted..];
        let mut hold = 0;
        for stop in &self.criteria.stop {
            for k in (1..stop.len().min(unsent.len() + 1)).rev() {
                if k > hold
                    && unsent.is_char_boundary(unsent.len() - k)
                    && stop.is_char_boundary(k)
                    && unsent.ends_with(&stop[..k])
                {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }

    fn take_until(&mut self, end: usize) -> String {
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
