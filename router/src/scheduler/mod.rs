//! One scheduler per engine: an actor task that owns the engine's
//! connection and drives the scheduling core (`heterospec_kv::schedule`:
//! waiting queue, running set, KV blocks, preemption, lookahead, the commit
//! rule) over it. This file only moves messages: submissions in, the core's
//! plan to the engine as a `Step`, the engine's results back into the core,
//! responses out to the clients; `request` holds what each request carries.
//!
//! A request is never lost: it ends with a finish reason, a cancellation
//! (client gone), or an error status. If the engine fails, every request on
//! it ends with `UNAVAILABLE`, the core is dropped with its accounting, and
//! the scheduler reconnects in the background (backoff with jitter); a
//! restarted engine starts with empty KV, and so does the new core.
//!
//! When steps overlap (`OverlapSteps`), while a step of steady decoding
//! runs the next one is already planned and sent (`schedule_ahead`), so
//! the engine starts it as soon as it is done, not after two gRPC hops and
//! this task's work.

mod config;
mod link;
mod request;
mod steps;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use heterospec_kv::schedule::{CommittedRun, NewSequence, ScheduleConfig, Scheduler as Core, Sequence};
use heterospec_kv::SeqId;
use heterospec_proto::engine::v1 as epb;
use heterospec_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::error::RouterError;
use crate::metrics as m;
use crate::output::FinishReason;
use crate::tokenizer::TextTokenizer;
use crate::validate::ValidatedRequest;
pub use config::{OverlapSteps, SchedulerConfig};
use link::{Backoff, ConnectError, EngineLink, StepCall};
pub use request::ResponseSender;
use request::{commit_tokens, results_by_id, Outcome, Request};

/// A request handed to a scheduler.
pub struct Submission {
    pub request: ValidatedRequest,
    pub responses: ResponseSender,
    /// The router-wide in-flight slot; dropping it gives the slot back.
    pub permit: OwnedSemaphorePermit,
    pub arrival: Instant,
    /// Already moved once from an engine that died before its first token.
    pub retried: bool,
}

/// A request handed back by the scheduler of engine `from`, which died
/// before the request streamed a token: the dispatcher tries another.
pub struct Retry {
    pub from: usize,
    pub submission: Submission,
}

/// State shared between a scheduler and the dispatcher.
#[derive(Debug, Default)]
pub struct EngineShared {
    pub healthy: AtomicBool,
    /// Found by discovery and gone from it: gets no new requests.
    pub retired: AtomicBool,
    /// Requests assigned and not finished.
    pub load: AtomicUsize,
    pub num_kv_blocks: AtomicUsize,
    pub block_size: AtomicUsize,
}

/// The dispatcher's handle on one scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    pub index: usize,
    pub url: String,
    pub submit: mpsc::Sender<Submission>,
    pub shared: Arc<EngineShared>,
    detach: mpsc::Sender<oneshot::Sender<()>>,
}

impl SchedulerHandle {
    /// Stops the scheduler for a clean shutdown: requests still running
    /// end `UNAVAILABLE` and its KV lease goes back to the engine
    /// (`Detach`), so a router started next leases it at once. Bounded in
    /// time; a scheduler already gone is a no-op.
    pub async fn detach(&self) {
        let (tx, rx) = oneshot::channel();
        if self.detach.send(tx).await.is_ok() {
            let _ = tokio::time::timeout(DETACH_TIMEOUT, rx).await;
        }
    }
}

/// How long a clean shutdown waits for one scheduler to give its lease back.
const DETACH_TIMEOUT: Duration = Duration::from_secs(3);

/// Capacity of the submission queue of one scheduler.
const SUBMIT_QUEUE: usize = 1024;
/// How often an idle scheduler checks that its engine is still the same.
const IDLE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The connected state: the engine link and the core planning for it.
struct Connected {
    link: EngineLink,
    core: Core<Request>,
}

pub struct Scheduler {
    index: usize,
    label: String,
    config: SchedulerConfig,
    endpoint: Endpoint,
    conn: Option<Connected>,
    backoff: Backoff,
    tokenizer: Arc<TextTokenizer>,
    /// Engine ids to release before the next step.
    to_release: Vec<u64>,
    /// A refused lease was logged (until one is granted).
    lease_refused: bool,
    submissions: mpsc::Receiver<Submission>,
    shared: Arc<EngineShared>,
    /// Requests to run elsewhere (see [`Retry`]).
    retries: mpsc::UnboundedSender<Retry>,
    /// Shutdown: stop and give the lease back, then answer.
    detach: mpsc::Receiver<oneshot::Sender<()>>,
    /// Steps sent and not yet applied, oldest first (two at most).
    in_flight: VecDeque<StepCall>,
    /// When the last step's answer was applied.
    last_answer: Instant,
}

impl Scheduler {
    /// Starts the scheduler task for the engine at `url`.
    pub fn spawn(
        index: usize,
        url: String,
        config: SchedulerConfig,
        tokenizer: Arc<TextTokenizer>,
        retries: mpsc::UnboundedSender<Retry>,
        tls: Option<ClientTlsConfig>,
    ) -> Result<SchedulerHandle, String> {
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| format!("bad engine URL {url}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("engine TLS for {url}: {e}"))?;
        }
        let (tx, rx) = mpsc::channel(SUBMIT_QUEUE);
        let (detach_tx, detach_rx) = mpsc::channel(1);
        let shared = Arc::new(EngineShared::default());
        let scheduler = Scheduler {
            index,
            label: index.to_string(),
            config,
            endpoint,
            conn: None,
            backoff: Backoff::default(),
            tokenizer,
            to_release: Vec::new(),
            lease_refused: false,
            submissions: rx,
            shared: shared.clone(),
            retries,
            detach: detach_rx,
            in_flight: VecDeque::new(),
            last_answer: Instant::now(),
        };
        tokio::spawn(scheduler.run());
        Ok(SchedulerHandle {
            index,
            url,
            submit: tx,
            shared,
            detach: detach_tx,
        })
    }

    async fn run(mut self) {
        loop {
            if self.conn.is_none() && !self.connect().await {
                // Requests that reach us while the engine is down are
                // refused at once, also while waiting to reconnect.
                let pause = tokio::time::sleep(self.backoff.next_delay());
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        sub = self.submissions.recv() => match sub {
                            Some(sub) => self.reject(sub, RouterError::EngineUnavailable("engine unavailable".into())),
                            // Dropped by discovery and nothing left to do.
                            None => return,
                        },
                        Some(done) = self.detach.recv() => return self.stop(done).await,
                    }
                }
                continue;
            }
            if let Ok(done) = self.detach.try_recv() {
                return self.stop(done).await;
            }
            if self.core().is_idle() && self.in_flight.is_empty() {
                self.update_gauges();
                if let Err(e) = self.release_pending().await {
                    self.fail_engine(e);
                    continue;
                }
                tokio::select! {
                    sub = self.submissions.recv() => match sub {
                        Some(sub) => self.enqueue(sub),
                        None => return,
                    },
                    Some(done) = self.detach.recv() => return self.stop(done).await,
                    _ = tokio::time::sleep(IDLE_PROBE_INTERVAL) => {
                        // An idle engine may have died or restarted.
                        let probe = self.conn.as_mut().expect("connected").link.probe().await;
                        if let Err(e) = probe {
                            self.fail_engine(e);
                        }
                        continue;
                    }
                }
            }
            while let Ok(sub) = self.submissions.try_recv() {
                self.enqueue(sub);
            }
            self.drop_cancelled();
            if let Err(e) = self.step().await {
                self.fail_engine(e);
            }
            self.update_gauges();
        }
    }

    fn core(&mut self) -> &mut Core<Request> {
        &mut self.conn.as_mut().expect("connected").core
    }

    /// Connects and leases KV; on success a fresh core plans for it.
    async fn connect(&mut self) -> bool {
        let link = match EngineLink::connect(&self.endpoint, self.index).await {
            Ok((link, _)) => link,
            Err(ConnectError::Unreachable) => return false,
            Err(ConnectError::LeaseRefused(message)) => {
                if !self.lease_refused {
                    tracing::warn!(engine = self.index, error = %message, "engine refused a KV lease; retrying");
                    self.lease_refused = true;
                }
                return false;
            }
            Err(ConnectError::TooSmall(blocks)) => {
                tracing::error!(engine = self.index, "engine leased {blocks} KV blocks");
                return false;
            }
        };
        let config = ScheduleConfig {
            max_batch_tokens: self.config.max_batch_tokens,
            max_running: self.config.max_running,
            max_prefill_chunk: usize::MAX,
            max_lookahead: link.max_lookahead,
        };
        let pool = link.new_pool();
        self.shared
            .num_kv_blocks
            .store(pool.num_usable_blocks(), Ordering::Release);
        self.shared.block_size.store(link.block_size, Ordering::Release);
        // Ids from a random base (below the engine's 2^48 limit, with room
        // to count), so a restarted router never reuses the ids of
        // sequences a surviving engine still holds.
        let first_seq_id = rand::random::<u64>() >> 18;
        self.conn = Some(Connected {
            core: Core::new(config, pool, first_seq_id),
            link,
        });
        self.lease_refused = false;
        if self.config.overlap_steps == OverlapSteps::On && !self.link().ordered_steps {
            tracing::warn!(
                engine = self.index,
                "--overlap-steps on, but this engine cannot run steps in order (an older build): steps will not overlap"
            );
        }
        self.backoff.reset();
        self.to_release.clear();
        self.shared.healthy.store(true, Ordering::Release);
        metrics::gauge!(m::ENGINE_UP, "engine" => self.label.clone()).set(1.0);
        true
    }

    fn reject(&self, sub: Submission, error: RouterError) {
        self.shared.load.fetch_sub(1, Ordering::AcqRel);
        metrics::counter!(m::REQUESTS_TOTAL, "outcome" => error.error_type()).increment(1);
        let _ = sub.responses.try_send(Err(error.into()));
    }

    fn enqueue(&mut self, sub: Submission) {
        let request = &sub.request;
        let seq = NewSequence {
            prompt_token_ids: request.prompt_token_ids.clone(),
            max_new_tokens: request.criteria.max_new_tokens,
            speculate: request.speculation != pb::SpeculationMode::Off,
            cache_salt: request.cache_salt.clone(),
        };
        if let Err(e) = seq.validate() {
            // Validation refuses these first; never lose one all the same.
            let field = match e {
                heterospec_kv::schedule::ScheduleError::InvalidRequest { field, .. } => field,
                _ => "request",
            };
            let reason = e.to_string();
            self.reject(sub, RouterError::InvalidArgument { field, reason });
            return;
        }
        let mut payload = Request::new(sub.request, sub.responses, sub.permit, sub.arrival);
        payload.retried = sub.retried;
        self.core().add(seq, payload).expect("validated above");
    }

    /// Ends requests whose client went away (or whose pending response can
    /// no longer be delivered); the core frees their blocks.
    fn drop_cancelled(&mut self) {
        let gone = self
            .core()
            .cancel(|s| s.payload.responses.is_closed() || !s.payload.flush_pending());
        for seq in gone {
            self.finish(seq, Outcome::Finished(FinishReason::Cancelled));
        }
    }

    /// Applies the oldest step in flight, first sending a newly planned one
    /// when none is in flight, and the next one ahead when it can be
    /// planned now (`overlap_steps`).
    async fn step(&mut self) -> Result<(), RouterError> {
        if self.in_flight.is_empty() {
            let plan = self.core().schedule();
            metrics::counter!(m::PREEMPTIONS_TOTAL).increment(plan.num_preempted as u64);
            for seq in plan.rejected {
                self.finish(seq, Outcome::Error(RouterError::KvExhausted));
            }
            let now = Instant::now();
            for a in &plan.admitted {
                metrics::counter!(m::PREFIX_CACHE_QUERIES_TOTAL).increment(a.num_queried_tokens as u64);
                metrics::counter!(m::PREFIX_CACHE_HITS_TOTAL).increment(a.num_cached_tokens as u64);
                let seq = self.core().get_mut(a.seq_id).expect("admitted");
                if a.first_admission {
                    let r = &mut seq.payload;
                    r.admitted_at = Some(now);
                    metrics::histogram!(m::QUEUE_DURATION_SECONDS).record((now - r.arrival).as_secs_f64());
                    metrics::counter!(m::PROMPT_TOKENS_TOTAL).increment(r.request.prompt_token_ids.len() as u64);
                }
            }
            if plan.runs.is_empty() {
                // Only when every remaining request was just ended above.
                return Ok(());
            }
            if !self.link().ordered_steps {
                self.release_pending().await?;
            }
            self.send(plan.runs);
        }
        if self.overlaps() && self.in_flight.len() == 1 {
            if let Some(runs) = self.core().schedule_ahead() {
                metrics::counter!(m::ENGINE_STEPS_OVERLAPPED_TOTAL).increment(1);
                self.send(runs);
            }
        }
        let call = self.in_flight.pop_front().expect("a step in flight");
        let head_of_line = call.sent.max(self.last_answer);
        let mut response = call
            .answer
            .await
            .map_err(|e| RouterError::EngineUnavailable(format!("engine step task: {e}")))??;
        self.last_answer = Instant::now();
        // The time this step was the oldest in flight: the sum over steps
        // is the time some step was in flight.
        metrics::histogram!(m::ENGINE_STEP_SECONDS, "engine" => self.label.clone())
            .record((self.last_answer - head_of_line).as_secs_f64());
        metrics::histogram!(m::ENGINE_BUSY_SECONDS, "engine" => self.label.clone()).record(response.engine_seconds);
        for failure in std::mem::take(&mut response.failures) {
            tracing::warn!(engine = self.index, seq = failure.seq_id, reason = %failure.reason, "the engine failed one sequence");
            if let Some(seq) = self.core().fail(SeqId(failure.seq_id)) {
                self.finish(seq, Outcome::Error(RouterError::SequenceFailed(failure.reason)));
            }
        }
        self.apply_results(response)
    }

    /// Applies what the engine committed, then sends each request's
    /// response. `Err` when the engine broke the step contract.
    fn apply_results(&mut self, response: epb::StepResponse) -> Result<(), RouterError> {
        let results = results_by_id(response);
        let committed = results
            .values()
            .map(|r| CommittedRun {
                seq_id: SeqId(r.seq_id),
                token_ids: r.tokens.iter().map(|t| t.token_id).collect(),
            })
            .collect();
        let now = Instant::now();
        let tokenizer = self.tokenizer.clone();
        let finished = self
            .core()
            .update(committed, |seq, _| {
                commit_tokens(seq, &results[&seq.seq_id()], &tokenizer, now)
            })
            .map_err(|e| RouterError::EngineContract(e.to_string()))?;
        for f in finished {
            let mut seq = f.sequence;
            match f.reason {
                Outcome::Finished(reason) => {
                    let resp = seq
                        .payload
                        .step_response
                        .take()
                        .expect("a finishing step has a response");
                    seq.payload.emit(resp);
                    self.release_and_record(seq, reason.as_str());
                }
                error => self.finish(seq, error),
            }
        }
        // Every other sequence's response of this step; a client gone by
        // now cancels its request.
        let gone = self.core().cancel(|s| match s.payload.step_response.take() {
            Some(resp) => !s.payload.emit(resp),
            None => false,
        });
        for seq in gone {
            self.finish(seq, Outcome::Finished(FinishReason::Cancelled));
        }
        Ok(())
    }

    /// Ends a sequence the core has let go of (its blocks are freed): sends
    /// its final message or error.
    fn finish(&mut self, mut seq: Sequence<Request>, outcome: Outcome) {
        match outcome {
            Outcome::Finished(reason) => {
                let delta = seq.payload.output.finish(&self.tokenizer, reason).unwrap_or_default();
                let resp = seq
                    .payload
                    .final_response(reason, seq.num_cached_prompt_tokens(), delta.text);
                seq.payload.emit(resp);
                self.release_and_record(seq, reason.as_str());
            }
            Outcome::Error(error) => {
                let label = error.error_type();
                seq.payload.send_last(Some(Err(error.into())));
                self.release_and_record(seq, label);
            }
        }
    }

    fn release_and_record(&mut self, mut seq: Sequence<Request>, outcome: &'static str) {
        // A final message that did not fit the stream is delivered in order
        // by a task, so a slow client never blocks the scheduler.
        seq.payload.send_last(None);
        self.shared.load.fetch_sub(1, Ordering::AcqRel);
        metrics::counter!(m::REQUESTS_TOTAL, "outcome" => outcome).increment(1);
        metrics::histogram!(m::REQUEST_DURATION_SECONDS).record(seq.payload.arrival.elapsed().as_secs_f64());
        tracing::debug!(
            engine = self.index,
            request = %seq.payload.request.request_id,
            outcome,
            generated = seq.num_generated(),
            "request finished"
        );
    }

    /// Ends the scheduler (see [`SchedulerHandle::detach`]): queued
    /// submissions and running requests end `UNAVAILABLE`, the lease goes
    /// back; then answers `done`.
    async fn stop(&mut self, done: oneshot::Sender<()>) {
        self.shared.healthy.store(false, Ordering::Release);
        self.abandon_in_flight();
        // Nothing new gets in; what already did is refused, not dropped.
        self.submissions.close();
        while let Ok(sub) = self.submissions.try_recv() {
            self.reject(sub, RouterError::ShuttingDown);
        }
        if let Some(mut conn) = self.conn.take() {
            for seq in conn.core.drain() {
                self.finish(seq, Outcome::Error(RouterError::ShuttingDown));
            }
            match conn.link.detach().await {
                Ok(()) => tracing::info!(engine = self.index, "KV lease given back"),
                Err(e) => tracing::warn!(engine = self.index, error = %e, "could not give the KV lease back"),
            }
        }
        let _ = done.send(());
    }

    /// The engine is gone: every request on it fails, accounting resets.
    /// A request that has streamed no token yet goes back to the
    /// dispatcher once, for another engine (engine-wide failures only).
    fn fail_engine(&mut self, error: RouterError) {
        tracing::warn!(engine = self.index, error = %error, "engine failed; ending its requests");
        self.shared.healthy.store(false, Ordering::Release);
        metrics::gauge!(m::ENGINE_UP, "engine" => self.label.clone()).set(0.0);
        self.abandon_in_flight();
        let Some(mut conn) = self.conn.take() else { return };
        let engine_wide = matches!(error, RouterError::EngineUnavailable(_));
        for seq in conn.core.drain() {
            let p = &seq.payload;
            if engine_wide && !p.retried && p.last_token_at.is_none() && !p.responses.is_closed() {
                self.shared.load.fetch_sub(1, Ordering::AcqRel);
                let p = seq.payload;
                let submission = Submission {
                    request: p.request,
                    responses: p.responses,
                    permit: p._permit,
                    arrival: p.arrival,
                    retried: true,
                };
                let _ = self.retries.send(Retry {
                    from: self.index,
                    submission,
                });
                continue;
            }
            self.finish(seq, Outcome::Error(error.clone()));
        }
        // Attaching again makes the engine release what it still holds.
        self.to_release.clear();
    }

    fn update_gauges(&mut self) {
        let label = self.label.clone();
        let Some(conn) = &self.conn else {
            metrics::gauge!(m::REQUESTS_RUNNING, "engine" => label.clone()).set(0.0);
            metrics::gauge!(m::REQUESTS_WAITING, "engine" => label).set(0.0);
            return;
        };
        let core = &conn.core;
        metrics::gauge!(m::REQUESTS_RUNNING, "engine" => label.clone()).set(core.num_running() as f64);
        metrics::gauge!(m::REQUESTS_WAITING, "engine" => label.clone()).set(core.num_waiting() as f64);
        let pool = core.pool();
        metrics::gauge!(m::KV_BLOCKS, "engine" => label.clone(), "state" => "used").set(pool.num_used_blocks() as f64);
        metrics::gauge!(m::KV_BLOCKS, "engine" => label, "state" => "free").set(pool.num_free_blocks() as f64);
    }
}
