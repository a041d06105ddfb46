//! Limits a request meets before any work is spent on it: its size in
//! bytes, its number of chat messages, and the bytes of prompts being
//! tokenized at once across the router; and the bounded pool tokenization
//! runs on, so that request threads and streams never wait behind it.
//!
//! Invariant: a prompt is tokenized only after its bytes passed
//! [`RequestLimits::precheck`] and hold permits of the in-flight byte
//! budget, on at most `tokenizer_threads` blocking threads at once.

use std::sync::Arc;

use heterospec_proto::v1 as pb;
use tokio::sync::Semaphore;

use crate::error::{Result, RouterError};

/// What one request may carry and how much tokenization runs at once.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Bytes of a prompt: `prompt`, or all of `messages`' contents and
    /// roles together (`--max-prompt-bytes`).
    pub max_prompt_bytes: usize,
    /// Chat messages per request (`--max-messages`).
    pub max_messages: usize,
    /// Bytes of one encoded request (`--max-request-bytes`: the gRPC
    /// server's decoding limit, enforced before the request is read).
    pub max_request_bytes: usize,
    /// Prompt bytes being tokenized at once, all requests together
    /// (`--max-inflight-prompt-bytes`).
    pub max_inflight_prompt_bytes: usize,
    /// Threads tokenizing at once (`--tokenizer-threads`).
    pub tokenizer_threads: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_prompt_bytes: 1 << 20,
            max_messages: 256,
            max_request_bytes: 4 << 20,
            max_inflight_prompt_bytes: 64 << 20,
            tokenizer_threads: 2,
        }
    }
}

impl RequestLimits {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            (self.max_prompt_bytes, "--max-prompt-bytes"),
            (self.max_messages, "--max-messages"),
            (self.max_request_bytes, "--max-request-bytes"),
            (self.max_inflight_prompt_bytes, "--max-inflight-prompt-bytes"),
            (self.tokenizer_threads, "--tokenizer-threads"),
        ];
        if let Some((_, flag)) = positive.iter().find(|(v, _)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        // Permits of the byte budget are taken with a u32 count.
        if self.max_inflight_prompt_bytes > u32::MAX as usize {
            return Err(format!("--max-inflight-prompt-bytes must be at most {}", u32::MAX));
        }
        if self.max_prompt_bytes > self.max_inflight_prompt_bytes {
            return Err("--max-prompt-bytes must not exceed --max-inflight-prompt-bytes".into());
        }
        Ok(())
    }

    /// The prompt's bytes, or the limit it breaks (named with its flag).
    pub fn precheck(&self, req: &pb::GenerateRequest) -> Result<usize> {
        let too_long = |field: &'static str, bytes: usize| RouterError::InvalidArgument {
            field,
            reason: format!(
                "{bytes} bytes exceed the limit of {} (--max-prompt-bytes)",
                self.max_prompt_bytes
            ),
        };
        match &req.input {
            Some(pb::generate_request::Input::Prompt(text)) => {
                if text.len() > self.max_prompt_bytes {
                    return Err(too_long("prompt", text.len()));
                }
                Ok(text.len())
            }
            Some(pb::generate_request::Input::Messages(m)) => {
                if m.messages.len() > self.max_messages {
                    return Err(RouterError::InvalidArgument {
                        field: "messages",
                        reason: format!(
                            "{} messages exceed the limit of {} (--max-messages)",
                            m.messages.len(),
                            self.max_messages
                        ),
                    });
                }
                let bytes = m.messages.iter().map(|m| m.role.len() + m.content.len()).sum();
                if bytes > self.max_prompt_bytes {
                    return Err(too_long("messages", bytes));
                }
                Ok(bytes)
            }
            // Token ids are checked against the context after decoding.
            Some(pb::generate_request::Input::PromptTokenIds(_)) | None => Ok(0),
        }
    }
}

/// Where prompts are tokenized: a byte budget and a bounded set of
/// blocking threads.
pub struct TokenizerPool {
    bytes: Arc<Semaphore>,
    threads: Arc<Semaphore>,
    max_inflight: usize,
}

impl TokenizerPool {
    pub fn new(limits: &RequestLimits) -> Self {
        TokenizerPool {
            bytes: Arc::new(Semaphore::new(limits.max_inflight_prompt_bytes)),
            threads: Arc::new(Semaphore::new(limits.tokenizer_threads)),
            max_inflight: limits.max_inflight_prompt_bytes,
        }
    }

    /// Runs `work` (tokenizing a prompt of `bytes`) on a blocking thread,
    /// holding `bytes` of the budget and a thread permit until the work
    /// ends (even when the caller stops waiting); refused at once when the
    /// budget is spent rather than queued.
    pub async fn run<T: Send + 'static>(
        &self,
        bytes: usize,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let budget = self
            .bytes
            .clone()
            .try_acquire_many_owned(bytes as u32)
            .map_err(|_| RouterError::PromptBytesExhausted { max: self.max_inflight })?;
        let thread = self
            .threads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RouterError::ShuttingDown)?;
        // The permits go with the work: a client that hangs up mid-way
        // drops this future, not the thread, which holds them to the end.
        tokio::task::spawn_blocking(move || {
            let _held = (budget, thread);
            work()
        })
        .await
        .map_err(|e| RouterError::Tokenizer(format!("tokenization did not finish: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(text: &str) -> pb::GenerateRequest {
        pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Prompt(text.into())),
            ..Default::default()
        }
    }

    #[test]
    fn prompt_bytes_and_message_counts_are_checked_with_their_flag_named() {
        let limits = RequestLimits {
            max_prompt_bytes: 8,
            max_messages: 2,
            ..RequestLimits::default()
        };
        assert_eq!(limits.precheck(&prompt("12345678")).unwrap(), 8);
        let e = limits.precheck(&prompt("123456789")).unwrap_err().to_string();
        assert!(e.contains("prompt") && e.contains("--max-prompt-bytes"), "{e}");
        let messages = |n: usize, content: &str| pb::GenerateRequest {
            input: Some(pb::generate_request::Input::Messages(pb::ChatMessages {
                messages: (0..n)
                    .map(|_| pb::ChatMessage {
                        role: "user".into(),
                        content: content.into(),
                    })
                    .collect(),
            })),
            ..Default::default()
        };
        assert!(limits.precheck(&messages(1, "a")).is_ok());
        let e = limits.precheck(&messages(3, "a")).unwrap_err().to_string();
        assert!(e.contains("messages") && e.contains("--max-messages"), "{e}");
        let e = limits.precheck(&messages(2, "abcd")).unwrap_err().to_string();
        assert!(e.contains("--max-prompt-bytes"), "{e}");
    }

    #[test]
    fn zero_limits_are_refused_naming_the_flag() {
        let bad = RequestLimits {
            tokenizer_threads: 0,
            ..RequestLimits::default()
        };
        assert!(bad.validate().unwrap_err().contains("--tokenizer-threads"));
        assert!(RequestLimits::default().validate().is_ok());
    }

    #[tokio::test]
    async fn a_spent_byte_budget_refuses_at_once() {
        let pool = TokenizerPool::new(&RequestLimits {
            max_prompt_bytes: 10,
            max_inflight_prompt_bytes: 10,
            ..RequestLimits::default()
        });
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let pool = Arc::new(pool);
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(8, move || {
                    rx.recv().ok();
                    Ok(())
                })
                .await
            })
        };
        // Wait until the first task holds its 8 bytes.
        while pool.bytes.available_permits() > 2 {
            tokio::task::yield_now().await;
        }
        let refused = pool.run(4, || Ok(())).await.unwrap_err();
        assert!(matches!(refused, RouterError::PromptBytesExhausted { max: 10 }));
        assert!(pool.run(2, || Ok(())).await.is_ok());
        tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
        assert!(pool.run(10, || Ok(())).await.is_ok());
    }
}
