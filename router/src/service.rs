//! The public `heterospec.v1.Generation` service and the state it shares
//! with the router's server: requests are validated, tokenized and handed to
//! the least-loaded healthy engine's scheduler, their responses streamed back
//! through a bounded channel. The gRPC port and the OpenAI-compatible HTTP
//! front (module `openai`) both call this one service.
//!
//! Invariant: a request is admitted only with a permit of the in-flight
//! semaphore, after validation, and never while the router drains.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use heterospec_proto::v1 as pb;
use heterospec_proto::v1::generation_server::Generation;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::RouterError;
use crate::limits::{RequestLimits, TokenizerPool};
use crate::scheduler::{Retry, SchedulerHandle, Submission};
use crate::tokenizer::TextTokenizer;
use crate::validate::{validate, ModelLimits, DEFAULT_MAX_NEW_TOKENS, MAX_STOP_STRINGS};

/// Responses buffered per stream before a slow client's responses are
/// coalesced (backpressure without blocking the scheduler).
const STREAM_BUFFER: usize = 32;

pub(crate) struct State {
    pub(crate) tokenizer: Arc<TextTokenizer>,
    pub(crate) limits: ModelLimits,
    pub(crate) request_limits: RequestLimits,
    pub(crate) tokenizing: TokenizerPool,
    pub(crate) engines: RwLock<Vec<SchedulerHandle>>,
    /// One permit per request in flight (`--max-concurrent-requests`).
    pub(crate) active: Arc<Semaphore>,
    pub(crate) max_concurrent: usize,
    pub(crate) draining: AtomicBool,
    pub(crate) model_name: String,
    pub(crate) next_request_id: AtomicUsize,
    /// Given to every scheduler: requests to run on another engine.
    pub(crate) retries: mpsc::UnboundedSender<Retry>,
    pub(crate) engine_tls: Option<tonic::transport::ClientTlsConfig>,
}

impl State {
    pub(crate) fn engines(&self) -> std::sync::RwLockReadGuard<'_, Vec<SchedulerHandle>> {
        self.engines.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn any_engine_healthy(&self) -> bool {
        self.engines().iter().any(|e| e.shared.healthy.load(Ordering::Acquire))
    }

    /// The healthy, not retired engine with the fewest requests (other
    /// than engine `except`).
    pub(crate) fn pick_engine(&self, except: Option<usize>) -> Option<SchedulerHandle> {
        self.engines()
            .iter()
            .filter(|e| e.shared.healthy.load(Ordering::Acquire) && !e.shared.retired.load(Ordering::Acquire))
            .filter(|e| Some(e.index) != except)
            .min_by_key(|e| e.shared.load.load(Ordering::Acquire))
            .cloned()
    }

    /// Hands `submission` to `engine`'s scheduler; gives it back when the
    /// queue is full.
    pub(crate) fn submit(&self, engine: &SchedulerHandle, submission: Submission) -> Result<(), Box<Submission>> {
        engine.shared.load.fetch_add(1, Ordering::AcqRel);
        engine.submit.try_send(submission).map_err(|e| {
            engine.shared.load.fetch_sub(1, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => Box::new(s),
            }
        })
    }

    /// A request whose engine died before its first token: once more on
    /// another engine, or `UNAVAILABLE` when there is none.
    pub(crate) fn retry(&self, retry: Retry) {
        let refuse = |submission: Submission, e: RouterError| {
            metrics::counter!(crate::metrics::REQUESTS_TOTAL, "outcome" => e.error_type()).increment(1);
            let _ = submission.responses.try_send(Err(e.into()));
        };
        match self.pick_engine(Some(retry.from)) {
            Some(engine) => {
                tracing::info!(from = retry.from, to = engine.index, "request moved to another engine");
                metrics::counter!(crate::metrics::REQUESTS_RETRIED_TOTAL).increment(1);
                if let Err(submission) = self.submit(&engine, retry.submission) {
                    refuse(*submission, RouterError::QueueFull);
                }
            }
            None => refuse(
                retry.submission,
                RouterError::EngineUnavailable("the request's engine failed and no other engine is available".into()),
            ),
        }
    }
}

#[derive(Clone)]
pub struct RouterService {
    pub(crate) state: Arc<State>,
}

impl RouterService {
    pub(crate) fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.state.tokenizer
    }

    pub(crate) fn model_name(&self) -> &str {
        &self.state.model_name
    }

    /// Prompt plus output tokens per request.
    pub(crate) fn max_context(&self) -> usize {
        self.state.limits.max_context
    }

    /// Not draining, and an engine is healthy.
    pub(crate) fn serving(&self) -> bool {
        !self.state.draining.load(Ordering::Acquire) && self.state.any_engine_healthy()
    }
}

#[tonic::async_trait]
impl Generation for RouterService {
    type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let arrival = Instant::now();
        let state = &self.state;
        let refuse = |e: RouterError| -> Status {
            metrics::counter!(crate::metrics::REQUESTS_TOTAL, "outcome" => e.error_type()).increment(1);
            e.into()
        };
        if state.draining.load(Ordering::Acquire) {
            return Err(RouterError::ShuttingDown.into());
        }
        // Whatever validation refuses counts under its own error type.
        let invalid = |e: RouterError| -> Status {
            metrics::counter!(crate::metrics::REQUESTS_TOTAL, "outcome" => e.error_type()).increment(1);
            e.into()
        };
        let request = request.into_inner();
        let bytes = state.request_limits.precheck(&request).map_err(invalid)?;
        let (tokenizer, limits) = (state.tokenizer.clone(), state.limits);
        let mut validated = state
            .tokenizing
            .run(bytes, move || validate(request, &tokenizer, limits))
            .await
            .map_err(|e| match e {
                RouterError::PromptBytesExhausted { .. } => refuse(e),
                e => invalid(e),
            })?;
        // Shutdown may have begun while the prompt was tokenized.
        if state.draining.load(Ordering::Acquire) {
            return Err(refuse(RouterError::ShuttingDown));
        }
        if validated.request_id.is_empty() {
            validated.request_id = format!("req-{}", state.next_request_id.fetch_add(1, Ordering::Relaxed));
        }
        let permit = state.active.clone().try_acquire_owned().map_err(|_| {
            refuse(RouterError::TooManyRequests {
                max: state.max_concurrent,
            })
        })?;
        let engine = state
            .pick_engine(None)
            .ok_or_else(|| refuse(RouterError::EngineUnavailable("no engine is available".into())))?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let submission = Submission {
            request: validated,
            responses: tx,
            permit,
            arrival,
            retried: false,
        };
        if state.submit(&engine, submission).is_err() {
            return Err(RouterError::QueueFull.into());
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let s = &self.state;
        let engines = s.engines().clone();
        let shared =
            |f: fn(&crate::scheduler::EngineShared) -> usize| -> usize { engines.iter().map(|e| f(&e.shared)).sum() };
        Ok(Response::new(pb::ModelInfoResponse {
            model: s.model_name.clone(),
            max_context: s.limits.max_context as u32,
            vocab_size: s.limits.vocab_size as u32,
            block_size: engines
                .iter()
                .map(|e| e.shared.block_size.load(Ordering::Acquire))
                .max()
                .unwrap_or(0) as u32,
            num_kv_blocks: shared(|e| e.num_kv_blocks.load(Ordering::Acquire)) as u32,
            num_engines: engines.len() as u32,
            default_max_new_tokens: DEFAULT_MAX_NEW_TOKENS as u32,
            max_stop_strings: MAX_STOP_STRINGS as u32,
            speculation_modes: vec![
                pb::SpeculationMode::Auto as i32,
                pb::SpeculationMode::Off as i32,
                pb::SpeculationMode::Fixed as i32,
                pb::SpeculationMode::Hetero as i32,
            ],
            speculation_note: "HETERO: entropy-tiered draft trees under one verification budget per engine step, \
                               sized by the engine's measured forward-cost curve (so a step verifies no draft \
                               tokens where that does not pay); AUTO is HETERO; FIXED verifies the calibration's \
                               base tree whatever it costs; an engine started with --drafter none decodes plainly"
                .into(),
        }))
    }
}
