//! One request as its scheduler keeps it (the payload of its sequence in
//! the scheduling core): where its responses go, its output stream (text
//! deltas, stop strings), its speculation counters and timestamps.
//!
//! Invariant: responses reach the client in order and a slow client never
//! blocks the scheduler: a response the stream cannot take now is kept
//! (merged with later ones) and handed over when there is room, and a
//! request's last message goes through a task if the stream is full.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use heterospec_kv::schedule::{Sequence, Verdict};
use heterospec_kv::SeqId;
use heterospec_proto::engine::v1 as epb;
use heterospec_proto::v1 as pb;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tonic::Status;

use crate::error::RouterError;
use crate::metrics as m;
use crate::output::{FinishReason, OutputStream};
use crate::tokenizer::TextTokenizer;
use crate::validate::ValidatedRequest;

/// Responses of one request, as the gRPC stream sees them.
pub type ResponseSender = mpsc::Sender<Result<pb::GenerateResponse, Status>>;

/// How long a stalled client gets to accept a request's last message.
const FINAL_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How a request ends.
#[derive(Debug)]
pub(crate) enum Outcome {
    Finished(FinishReason),
    Error(RouterError),
}

pub(crate) struct Request {
    pub request: ValidatedRequest,
    pub responses: ResponseSender,
    /// The router-wide in-flight slot, given back when the request ends.
    pub _permit: OwnedSemaphorePermit,
    pub arrival: Instant,
    /// Speculation counters for the final response.
    pub spec: pb::SpeculationStats,
    pub output: OutputStream,
    pub admitted_at: Option<Instant>,
    pub last_token_at: Option<Instant>,
    /// Coalesced response not yet accepted by the stream (slow client).
    pending: Option<pb::GenerateResponse>,
    /// This step's response, built while committing, sent after it.
    pub step_response: Option<pb::GenerateResponse>,
    /// Moved here from an engine that died before its first token.
    pub retried: bool,
}

impl Request {
    pub fn new(
        request: ValidatedRequest,
        responses: ResponseSender,
        permit: OwnedSemaphorePermit,
        arrival: Instant,
    ) -> Self {
        Request {
            output: OutputStream::new(request.criteria.clone()),
            request,
            responses,
            _permit: permit,
            arrival,
            spec: pb::SpeculationStats::default(),
            admitted_at: None,
            last_token_at: None,
            pending: None,
            step_response: None,
            retried: false,
        }
    }

    /// Queues `resp` behind anything pending and tries to hand it over.
    /// Returns false when the client is gone.
    pub fn emit(&mut self, resp: pb::GenerateResponse) -> bool {
        let merged = match self.pending.take() {
            None => resp,
            Some(mut p) => {
                p.token_ids.extend(resp.token_ids);
                p.text.push_str(&resp.text);
                p.logprobs.extend(resp.logprobs);
                p.top_logprobs.extend(resp.top_logprobs);
                p.finish_reason = resp.finish_reason;
                p.usage = resp.usage.or(p.usage);
                p.speculation = resp.speculation.or(p.speculation);
                if p.prompt_token_ids.is_empty() {
                    p.prompt_token_ids = resp.prompt_token_ids;
                }
                p
            }
        };
        match self.responses.try_send(Ok(merged)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(Ok(resp))) => {
                self.pending = Some(resp);
                true
            }
            Err(_) => false,
        }
    }

    /// Hands over what is pending; false when the client is gone.
    pub fn flush_pending(&mut self) -> bool {
        match self.pending.take() {
            None => !self.responses.is_closed(),
            Some(p) => self.emit(p),
        }
    }

    /// Sends what is still pending, then `last` (if any), through a task
    /// when the stream is full.
    pub fn send_last(&mut self, last: Option<Result<pb::GenerateResponse, Status>>) {
        let mut queue: Vec<Result<pb::GenerateResponse, Status>> = self.pending.take().map(Ok).into_iter().collect();
        queue.extend(last);
        let mut queue = queue.into_iter();
        for item in queue.by_ref() {
            match self.responses.try_send(item) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(item)) => {
                    let tx = self.responses.clone();
                    let rest: Vec<_> = std::iter::once(item).chain(queue).collect();
                    tokio::spawn(async move {
                        for item in rest {
                            if tokio::time::timeout(FINAL_SEND_TIMEOUT, tx.send(item)).await.is_err() {
                                break;
                            }
                        }
                    });
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }

    pub fn speculation_stats(&self) -> pb::SpeculationStats {
        let mut stats = self.spec.clone();
        stats.tier_steps.resize(8, 0);
        stats.mean_acceptance_length = if stats.steps == 0 {
            0.0
        } else {
            1.0 + stats.accepted_tokens as f32 / stats.steps as f32
        };
        stats
    }

    pub fn usage(&self, num_cached_prompt_tokens: usize) -> pb::Usage {
        pb::Usage {
            prompt_tokens: self.request.prompt_token_ids.len() as u32,
            completion_tokens: self.output.num_tokens() as u32,
            cached_prompt_tokens: num_cached_prompt_tokens as u32,
        }
    }

    /// The last message of a request that finished with `reason`.
    pub fn final_response(&self, reason: FinishReason, num_cached: usize, text: String) -> pb::GenerateResponse {
        pb::GenerateResponse {
            request_id: self.request.request_id.clone(),
            text,
            finish_reason: finish_reason_proto(reason) as i32,
            usage: Some(self.usage(num_cached)),
            speculation: Some(self.speculation_stats()),
            ..Default::default()
        }
    }
}

pub(crate) fn finish_reason_proto(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// The verdict on what the engine committed for one sequence: counts its
/// speculation, runs the tokens through the output stream (a stop inside
/// the run cuts it there), records latency metrics and builds the step's
/// response into `step_response` (a finishing one carries usage and stats).
pub(crate) fn commit_tokens(
    seq: &mut Sequence<Request>,
    result: &epb::SeqResult,
    tokenizer: &TextTokenizer,
    now: Instant,
) -> Verdict<Outcome> {
    let num_cached = seq.num_cached_prompt_tokens();
    let r = &mut seq.payload;
    r.spec.steps += 1;
    if result.speculated {
        r.spec.verified_tokens += result.num_draft_tokens;
        r.spec.accepted_tokens += result.num_accepted_tokens;
        if (1..=8).contains(&result.tier) {
            r.spec.tier_steps.resize(8, 0);
            r.spec.tier_steps[result.tier as usize - 1] += 1;
        }
    }
    let mut resp = pb::GenerateResponse {
        request_id: r.request.request_id.clone(),
        ..Default::default()
    };
    if r.last_token_at.is_none() && r.request.echo_prompt_token_ids {
        resp.prompt_token_ids = r.request.prompt_token_ids.clone();
    }
    match r.last_token_at {
        None => metrics::histogram!(m::TIME_TO_FIRST_TOKEN_SECONDS).record((now - r.arrival).as_secs_f64()),
        Some(t) => {
            let gap = (now - t).as_secs_f64() / result.tokens.len() as f64;
            for _ in 0..result.tokens.len() {
                metrics::histogram!(m::INTER_TOKEN_LATENCY_SECONDS).record(gap);
            }
        }
    }
    r.last_token_at = Some(now);
    let mut verdict = Verdict::keep_all(result.tokens.len());
    for (i, t) in result.tokens.iter().enumerate() {
        resp.token_ids.push(t.token_id);
        if r.request.logprobs {
            resp.logprobs.push(t.logprob);
            if r.request.sampling.top_logprobs > 0 {
                resp.top_logprobs.push(pb::TopLogprobs {
                    token_ids: t.top_token_ids.clone(),
                    logprobs: t.top_logprobs.clone(),
                });
            }
        }
        match r.output.push(tokenizer, t.token_id) {
            Ok(delta) => {
                resp.text.push_str(&delta.text);
                if let Some(reason) = delta.finish_reason {
                    verdict = Verdict {
                        keep: i + 1,
                        finish: Some(Outcome::Finished(reason)),
                    };
                    break;
                }
            }
            Err(e) => {
                verdict = Verdict {
                    keep: i + 1,
                    finish: Some(Outcome::Error(RouterError::Detokenize(e.to_string()))),
                };
                break;
            }
        }
    }
    metrics::counter!(m::GENERATED_TOKENS_TOTAL).increment(resp.token_ids.len() as u64);
    if let Some(Outcome::Finished(reason)) = &verdict.finish {
        resp.finish_reason = finish_reason_proto(*reason) as i32;
        resp.usage = Some(r.usage(num_cached));
        resp.speculation = Some(r.speculation_stats());
    }
    if !matches!(verdict.finish, Some(Outcome::Error(_))) {
        r.step_response = Some(resp);
    }
    verdict
}

/// The engine's results by sequence.
pub(crate) fn results_by_id(response: epb::StepResponse) -> HashMap<SeqId, epb::SeqResult> {
    response.seqs.into_iter().map(|r| (SeqId(r.seq_id), r)).collect()
}
