//! One scheduler per engine: an actor task that owns the engine's KV block
//! accounting, its waiting queue and running set, and drives engine steps.
//!
//! Each iteration builds one step under a token budget: running sequences
//! first (oldest first: their decode token, or their next prompt chunk),
//! then waiting ones while KV blocks can be had (prefix-cache hits skip the
//! cached part). When a running sequence needs a block and none is free, the
//! newest running request is preempted: its blocks are freed and it goes
//! back to the front of the queue with everything it generated so far, to
//! be recomputed. A request is never lost: it ends with a finish reason, a
//! cancellation (client gone), or an error status.
//!
//! If the engine fails, every request on it ends with `UNAVAILABLE`, its
//! accounting is dropped, and the scheduler reconnects in the background;
//! a restarted engine starts with empty KV, and so does the new pool.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use heterospec_kv::{BlockPool, BlockPoolConfig, BlockTable};
use heterospec_proto::engine::v1 as epb;
use heterospec_proto::engine::v1::engine_client::EngineClient;
use heterospec_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::metrics as m;
use crate::output::{FinishReason, OutputStream};
use crate::tokenizer::TextTokenizer;
use crate::validate::ValidatedRequest;

/// Responses of one request, as the gRPC stream sees them.
pub type ResponseSender = mpsc::Sender<Result<pb::GenerateResponse, Status>>;

/// Scheduling knobs.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Tokens (prompt chunks + decode tokens) per engine step.
    pub max_batch_tokens: usize,
    /// Sequences per engine step.
    pub max_running: usize,
    /// Deadline for one engine step before the engine counts as failed.
    pub step_timeout: Duration,
}

/// Counts requests in flight across the router; dropping it gives the slot back.
pub struct RequestPermit {
    active: Arc<AtomicUsize>,
}

impl RequestPermit {
    /// Takes a slot if fewer than `max` requests are active.
    pub fn try_acquire(active: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| RequestPermit { active: active.clone() })
    }
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request handed to a scheduler.
pub struct Submission {
    pub request: ValidatedRequest,
    pub responses: ResponseSender,
    pub permit: RequestPermit,
    pub arrival: Instant,
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
    pub url: String,
    pub submit: mpsc::Sender<Submission>,
    pub shared: Arc<EngineShared>,
}

struct Sequence {
    /// Engine-side id; a new one after each preemption.
    seq_id: u64,
    request: ValidatedRequest,
    responses: ResponseSender,
    _permit: RequestPermit,
    arrival: Instant,
    /// Prompt, then every generated token.
    token_ids: Vec<u32>,
    num_computed: usize,
    /// Tokens run in the step in flight.
    num_scheduled: usize,
    /// Slots reserved after them for accepted draft tokens.
    lookahead: usize,
    /// Speculation counters for the final response.
    spec: pb::SpeculationStats,
    table: BlockTable,
    engine_knows: bool,
    output: OutputStream,
    cached_prompt_tokens: usize,
    admitted_at: Option<Instant>,
    last_token_at: Option<Instant>,
    /// Coalesced response not yet accepted by the stream (slow client).
    pending: Option<pb::GenerateResponse>,
}

impl Sequence {
    fn num_generated(&self) -> usize {
        self.token_ids.len() - self.request.prompt_token_ids.len()
    }

    /// Queues `resp` behind anything pending and tries to hand it over.
    /// Returns false when the client is gone.
    fn emit(&mut self, resp: pb::GenerateResponse) -> bool {
        let merged = match self.pending.take() {
            None => resp,
            Some(mut p) => {
                p.token_ids.extend(resp.token_ids);
                p.text.push_str(&resp.text);
                p.logprobs.extend(resp.logprobs);
                p.finish_reason = resp.finish_reason;
                p.usage = resp.usage.or(p.usage);
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

    fn flush_pending(&mut self) -> bool {
        match self.pending.take() {
            None => !self.responses.is_closed(),
            Some(p) => self.emit(p),
        }
    }

    fn finish_reason_proto(reason: FinishReason) -> pb::FinishReason {
        match reason {
            FinishReason::Length => pb::FinishReason::Length,
            FinishReason::Eos => pb::FinishReason::Eos,
            FinishReason::Stop => pb::FinishReason::Stop,
            FinishReason::Cancelled => pb::FinishReason::Cancelled,
        }
    }

    fn speculation_stats(&self) -> pb::SpeculationStats {
        let mut stats = self.spec.clone();
        stats.tier_steps.resize(8, 0);
        stats.mean_acceptance_length = if stats.steps == 0 {
            0.0
        } else {
            1.0 + stats.accepted_tokens as f32 / stats.steps as f32
        };
        stats
    }

    fn usage(&self) -> pb::Usage {
        pb::Usage {
            prompt_tokens: self.request.prompt_token_ids.len() as u32,
            completion_tokens: self.output.num_tokens() as u32,
            cached_prompt_tokens: self.cached_prompt_tokens as u32,
        }
    }
}

enum Outcome {
    Finished(FinishReason),
    Error(Status, &'static str),
}

pub struct Scheduler {
    index: usize,
    label: String,
    config: SchedulerConfig,
    endpoint: Endpoint,
    client: Option<EngineClient<Channel>>,
    pool: Option<BlockPool>,
    instance_id: u64,
    /// Most draft tokens the engine accepts per step (its lookahead).
    max_lookahead: usize,
    tokenizer: Arc<TextTokenizer>,
    waiting: VecDeque<Sequence>,
    /// Admission order: the newest is last.
    running: Vec<Sequence>,
    to_release: Vec<u64>,
    /// The KV partition this router holds on the engine (`Attach`).
    lease_id: u64,
    /// A refused lease was logged (until one is granted).
    lease_refused: bool,
    next_seq_id: u64,
    submissions: mpsc::Receiver<Submission>,
    shared: Arc<EngineShared>,
}

/// The id under which scheduler `index` of this router process leases KV
/// on its engine (random per start; distinct per scheduler, so that two
/// schedulers never replace each other's lease on one engine).
fn router_id(index: usize) -> u64 {
    static BASE: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    use std::hash::BuildHasher;
    BASE.get_or_init(std::hash::RandomState::new)
        .hash_one((std::process::id(), index))
}

/// `host:pid`, for the engine's logs.
fn router_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "router".into());
    format!("{host}:{}", std::process::id())
}

/// Capacity of the submission queue of one scheduler.
const SUBMIT_QUEUE: usize = 1024;
/// Pause between reconnection attempts to a failed engine.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(250);
/// How long a stalled client gets to accept a request's last message.
const FINAL_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an idle scheduler checks that its engine is still the same.
const IDLE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

impl Scheduler {
    /// Starts the scheduler task for the engine at `url`.
    pub fn spawn(
        index: usize,
        url: String,
        config: SchedulerConfig,
        tokenizer: Arc<TextTokenizer>,
    ) -> Result<SchedulerHandle, String> {
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| format!("bad engine URL {url}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let (tx, rx) = mpsc::channel(SUBMIT_QUEUE);
        let shared = Arc::new(EngineShared::default());
        let scheduler = Scheduler {
            index,
            label: index.to_string(),
            config,
            endpoint,
            client: None,
            pool: None,
            instance_id: 0,
            max_lookahead: 0,
            tokenizer,
            waiting: VecDeque::new(),
            running: Vec::new(),
            to_release: Vec::new(),
            // Ids from a random base (below the engine's 2^48 limit, with
            // room to count), so a restarted router never reuses the ids of
            // sequences a surviving engine still holds.
            next_seq_id: {
                use std::hash::{BuildHasher, RandomState};
                RandomState::new().hash_one(index) >> 18
            },
            lease_id: 0,
            lease_refused: false,
            submissions: rx,
            shared: shared.clone(),
        };
        tokio::spawn(scheduler.run());
        Ok(SchedulerHandle {
            url,
            submit: tx,
            shared,
        })
    }

    async fn run(mut self) {
        loop {
            if self.client.is_none() {
                if !self.connect().await {
                    // Requests that reached us while the engine is down.
                    loop {
                        match self.submissions.try_recv() {
                            Ok(sub) => self.reject(sub, Status::unavailable("engine unavailable")),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            // Dropped by discovery and nothing left to do.
                            Err(mpsc::error::TryRecvError::Disconnected) => return,
                        }
                    }
                    tokio::time::sleep(RECONNECT_INTERVAL).await;
                    continue;
                }
            }
            if self.running.is_empty() && self.waiting.is_empty() {
                self.update_gauges();
                if !self.to_release.is_empty() {
                    if let Err(status) = self.release_pending().await {
                        self.fail_engine(status);
                        continue;
                    }
                }
                tokio::select! {
                    sub = self.submissions.recv() => match sub {
                        Some(sub) => self.enqueue(sub),
                        None => return,
                    },
                    _ = tokio::time::sleep(IDLE_PROBE_INTERVAL) => {
                        // An idle engine may have died or restarted.
                        if let Err(status) = self.probe().await {
                            self.fail_engine(status);
                        }
                        continue;
                    }
                }
            }
            while let Ok(sub) = self.submissions.try_recv() {
                self.enqueue(sub);
            }
            self.drop_cancelled();
            if let Err(status) = self.step().await {
                self.fail_engine(status);
            }
            self.update_gauges();
        }
    }

    /// Asks the engine for its shape; on success builds a fresh block pool.
    async fn connect(&mut self) -> bool {
        let mut client = EngineClient::new(self.endpoint.connect_lazy())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let info = match tokio::time::timeout(Duration::from_secs(2), client.info(epb::InfoRequest::default())).await {
            Ok(Ok(info)) => info.into_inner(),
            _ => return false,
        };
        // Our partition of the engine's KV blocks; attaching again after a
        // failure replaces our old lease, and the engine releases the
        // sequences it still held for us.
        let attach = epb::AttachRequest {
            router_id: router_id(self.index),
            router_name: router_name(),
        };
        let lease = match tokio::time::timeout(Duration::from_secs(2), client.attach(attach)).await {
            Ok(Ok(lease)) => lease.into_inner(),
            Ok(Err(s)) => {
                if !self.lease_refused {
                    tracing::warn!(engine = self.index, error = %s.message(), "engine refused a KV lease; retrying");
                    self.lease_refused = true;
                }
                return false;
            }
            Err(_) => return false,
        };
        if lease.num_kv_blocks < 2 {
            tracing::error!(engine = self.index, "engine leased {} KV blocks", lease.num_kv_blocks);
            return false;
        }
        let pool = BlockPool::new(BlockPoolConfig {
            num_blocks: lease.num_kv_blocks as usize,
            block_size: info.block_size as usize,
        });
        self.shared
            .num_kv_blocks
            .store(pool.num_usable_blocks(), Ordering::Release);
        self.shared
            .block_size
            .store(info.block_size as usize, Ordering::Release);
        tracing::info!(
            engine = self.index,
            model = %info.model,
            blocks = lease.num_kv_blocks,
            partition = lease.partition,
            partitions = lease.num_partitions,
            instance = info.instance_id,
            "connected to engine"
        );
        self.pool = Some(pool);
        self.lease_id = lease.lease_id;
        self.lease_refused = false;
        self.instance_id = info.instance_id;
        self.max_lookahead = info.max_lookahead as usize;
        self.client = Some(client);
        self.to_release.clear();
        self.shared.healthy.store(true, Ordering::Release);
        metrics::gauge!(m::ENGINE_UP, "engine" => self.label.clone()).set(1.0);
        true
    }

    fn reject(&self, sub: Submission, status: Status) {
        self.shared.load.fetch_sub(1, Ordering::AcqRel);
        metrics::counter!(m::REQUESTS_TOTAL, "outcome" => "unavailable").increment(1);
        let _ = sub.responses.try_send(Err(status));
    }

    fn enqueue(&mut self, sub: Submission) {
        let request = sub.request;
        let output = OutputStream::new(request.criteria.clone());
        let seq = Sequence {
            seq_id: self.new_seq_id(),
            token_ids: request.prompt_token_ids.clone(),
            request,
            responses: sub.responses,
            _permit: sub.permit,
            arrival: sub.arrival,
            num_computed: 0,
            num_scheduled: 0,
            lookahead: 0,
            spec: pb::SpeculationStats::default(),
            table: BlockTable::new(),
            engine_knows: false,
            output,
            cached_prompt_tokens: 0,
            admitted_at: None,
            last_token_at: None,
            pending: None,
        };
        self.waiting.push_back(seq);
    }

    fn new_seq_id(&mut self) -> u64 {
        let id = self.next_seq_id;
        self.next_seq_id += 1;
        id
    }

    fn pool(&mut self) -> &mut BlockPool {
        self.pool.as_mut().expect("connected")
    }

    /// Ends requests whose client went away; frees their blocks.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].responses.is_closed() {
                let seq = self.running.remove(i);
                self.finish(seq, Outcome::Finished(FinishReason::Cancelled));
            } else {
                if !self.running[i].flush_pending() {
                    let seq = self.running.remove(i);
                    self.finish(seq, Outcome::Finished(FinishReason::Cancelled));
                    continue;
                }
                i += 1;
            }
        }
        let (closed, open): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|s| s.responses.is_closed());
        self.waiting = open.into();
        for seq in closed {
            self.finish(seq, Outcome::Finished(FinishReason::Cancelled));
        }
    }

    /// Frees the newest running sequence's blocks and requeues it first.
    fn preempt_newest(&mut self) {
        let mut seq = self.running.pop().expect("a running sequence to preempt");
        self.pool().free_table(&mut seq.table);
        if seq.engine_knows {
            self.to_release.push(seq.seq_id);
        }
        seq.seq_id = self.new_seq_id();
        seq.engine_knows = false;
        seq.num_computed = 0;
        seq.num_scheduled = 0;
        metrics::counter!(m::PREEMPTIONS_TOTAL).increment(1);
        tracing::debug!(engine = self.index, request = %seq.request.request_id, "preempted");
        self.waiting.push_front(seq);
    }

    /// Builds and runs one step. `Err` means the engine failed.
    async fn step(&mut self) -> Result<(), Status> {
        let mut budget = self.config.max_batch_tokens;
        // Running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = (seq.token_ids.len() - seq.num_computed).min(budget);
            let need = seq.num_computed + n;
            let lookahead = self.lookahead_for(seq, n);
            let mut table = std::mem::take(&mut self.running[i].table);
            // Lookahead slots if they fit, else plain decoding this step.
            let got = if self.pool().allocate_slots(&mut table, need + lookahead).is_some() {
                Some(lookahead)
            } else {
                self.pool().allocate_slots(&mut table, need).map(|_| 0)
            };
            self.running[i].table = table;
            if let Some(lookahead) = got {
                self.running[i].num_scheduled = n;
                self.running[i].lookahead = lookahead;
                budget -= n;
                i += 1;
                continue;
            }
            if i + 1 < self.running.len() {
                self.preempt_newest();
            } else if i > 0 {
                // This is the newest: it yields to the older ones.
                self.preempt_newest();
                break;
            } else {
                // Alone and still out of blocks: it can never fit.
                let seq = self.running.remove(0);
                let status = Status::resource_exhausted("the request needs more KV blocks than the engine has");
                self.finish(seq, Outcome::Error(status, "kv_exhausted"));
            }
        }
        // Admit waiting sequences while budget and blocks last.
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let mut hit = 0;
            if seq.num_computed == 0 && seq.table.num_blocks() == 0 {
                let max_tokens = seq.token_ids.len() - 1;
                let tokens = std::mem::take(&mut seq.token_ids);
                let salt = seq.request.cache_salt.clone();
                hit = self
                    .pool()
                    .attach_cached_prefix(&mut seq.table, &tokens, salt.as_deref(), max_tokens)
                    .num_cached_tokens;
                seq.token_ids = tokens;
                seq.num_computed = hit;
            }
            let n = (seq.token_ids.len() - seq.num_computed).min(budget);
            let need = seq.num_computed + n;
            let lookahead = self.lookahead_for(&seq, n);
            seq.lookahead = if self.pool().allocate_slots(&mut seq.table, need + lookahead).is_some() {
                lookahead
            } else {
                0
            };
            if self.pool().allocate_slots(&mut seq.table, need).is_none() {
                self.pool().free_table(&mut seq.table);
                seq.num_computed = 0;
                if self.running.is_empty() {
                    // Every block is free and it still does not fit.
                    let status = Status::resource_exhausted("the request needs more KV blocks than the engine has");
                    self.finish(seq, Outcome::Error(status, "kv_exhausted"));
                    continue;
                }
                self.waiting.push_front(seq);
                break;
            }
            let now = Instant::now();
            if seq.admitted_at.is_none() {
                seq.admitted_at = Some(now);
                seq.cached_prompt_tokens = hit;
                metrics::histogram!(m::QUEUE_DURATION_SECONDS).record((now - seq.arrival).as_secs_f64());
                metrics::counter!(m::PROMPT_TOKENS_TOTAL).increment(seq.request.prompt_token_ids.len() as u64);
            }
            metrics::counter!(m::PREFIX_CACHE_QUERIES_TOTAL).increment(seq.token_ids.len() as u64);
            metrics::counter!(m::PREFIX_CACHE_HITS_TOTAL).increment(hit as u64);
            seq.num_scheduled = n;
            budget -= n;
            self.running.push(seq);
        }

        let steps: Vec<epb::SeqStep> = self
            .running
            .iter()
            .filter(|s| s.num_scheduled > 0)
            .map(|s| {
                let end = s.num_computed + s.num_scheduled;
                epb::SeqStep {
                    seq_id: s.seq_id,
                    new_token_ids: s.token_ids[s.num_computed..end].to_vec(),
                    num_computed: s.num_computed as u32,
                    block_table: s.table.block_ids().iter().map(|b| b.0).collect(),
                    sampling: (!s.engine_knows).then(|| s.request.sampling),
                    cached_token_ids: if s.engine_knows {
                        vec![]
                    } else {
                        s.token_ids[..s.num_computed].to_vec()
                    },
                    sample: end == s.token_ids.len(),
                    speculation: s.request.speculation as i32,
                    lookahead: s.lookahead as u32,
                }
            })
            .collect();
        if steps.is_empty() {
            // Only when every remaining request was just ended above.
            return Ok(());
        }

        if !self.to_release.is_empty() {
            self.release_pending().await?;
        }
        let client = self.client.as_mut().expect("connected");
        let request = epb::StepRequest {
            seqs: steps,
            instance_id: self.instance_id,
            lease_id: self.lease_id,
        };
        let response = tokio::time::timeout(self.config.step_timeout, client.step(request))
            .await
            .map_err(|_| Status::unavailable("engine step timed out"))?
            .map_err(|s| {
                if s.code() == tonic::Code::FailedPrecondition {
                    Status::unavailable(format!("engine restarted or KV lease lost: {}", s.message()))
                } else if s.code() == tonic::Code::InvalidArgument {
                    // A contract violation is our bug, but the engine's state
                    // for these sequences is unknown: treat as a failure.
                    Status::internal(format!("engine refused the step: {}", s.message()))
                } else {
                    Status::unavailable(format!("engine failed: {}", s.message()))
                }
            })?
            .into_inner();
        self.apply_results(response)
    }

    /// Slots to reserve for accepted draft tokens when a run of `n` tokens
    /// ends the known ones: the engine's lookahead, capped by what the
    /// request may still generate.
    fn lookahead_for(&self, seq: &Sequence, n: usize) -> usize {
        let samples = seq.num_computed + n == seq.token_ids.len();
        if !samples || seq.request.speculation == pb::SpeculationMode::Off {
            return 0;
        }
        let remaining = seq.request.criteria.max_new_tokens.saturating_sub(seq.num_generated());
        self.max_lookahead.min(remaining.saturating_sub(1))
    }

    /// Checks that the engine answers and is the instance we planned for.
    async fn probe(&mut self) -> Result<(), Status> {
        let client = self.client.as_mut().expect("connected");
        let request = epb::InfoRequest {
            lease_id: self.lease_id,
        };
        let info = tokio::time::timeout(Duration::from_secs(2), client.info(request))
            .await
            .map_err(|_| Status::unavailable("engine does not answer"))?
            .map_err(|s| Status::unavailable(format!("engine failed: {}", s.message())))?
            .into_inner();
        if info.instance_id != self.instance_id {
            return Err(Status::unavailable("engine restarted"));
        }
        Ok(())
    }

    async fn release_pending(&mut self) -> Result<(), Status> {
        let ids = std::mem::take(&mut self.to_release);
        let client = self.client.as_mut().expect("connected");
        tokio::time::timeout(
            self.config.step_timeout,
            client.release(epb::ReleaseRequest {
                seq_ids: ids,
                lease_id: self.lease_id,
            }),
        )
        .await
        .map_err(|_| Status::unavailable("engine release timed out"))?
        .map_err(|s| Status::unavailable(format!("engine failed: {}", s.message())))?;
        Ok(())
    }

    /// Applies what the engine committed. `Err` when the engine broke the
    /// contract (no token for a sequence that was to be sampled).
    fn apply_results(&mut self, response: epb::StepResponse) -> Result<(), Status> {
        let mut results: HashMap<u64, epb::SeqResult> = response.seqs.into_iter().map(|r| (r.seq_id, r)).collect();
        let now = Instant::now();
        let mut finished = Vec::new();
        for seq in &self.running {
            let sampled = seq.num_scheduled > 0 && seq.num_computed + seq.num_scheduled == seq.token_ids.len();
            let has_token = results.get(&seq.seq_id).is_some_and(|r| !r.tokens.is_empty());
            if sampled && !has_token {
                return Err(Status::internal(format!(
                    "engine committed no token for sequence {}",
                    seq.seq_id
                )));
            }
        }
        for (i, seq) in self.running.iter_mut().enumerate() {
            if seq.num_scheduled == 0 {
                continue;
            }
            let result = results.remove(&seq.seq_id);
            let num_run = seq.num_scheduled;
            seq.num_scheduled = 0;
            seq.lookahead = 0;
            seq.engine_knows = true;
            let salt = seq.request.cache_salt.clone();
            let pool = self.pool.as_mut().expect("connected");
            let committed = result.as_ref().map_or(0, |r| r.tokens.len());
            if committed == 0 {
                seq.num_computed += num_run;
                pool.register_full_blocks(&mut seq.table, &seq.token_ids[..seq.num_computed], salt.as_deref());
                pool.truncate(&mut seq.table, seq.num_computed);
                continue;
            }
            let result = result.expect("committed tokens");
            // KV now holds the run and every committed token but the last.
            seq.num_computed += num_run + committed - 1;
            seq.spec.steps += 1;
            if result.speculated {
                seq.spec.verified_tokens += result.num_draft_tokens;
                seq.spec.accepted_tokens += result.num_accepted_tokens;
                if (1..=8).contains(&result.tier) {
                    seq.spec.tier_steps.resize(8, 0);
                    seq.spec.tier_steps[result.tier as usize - 1] += 1;
                }
            }
            let mut resp = pb::GenerateResponse {
                request_id: seq.request.request_id.clone(),
                ..Default::default()
            };
            if seq.last_token_at.is_none() && seq.request.echo_prompt_token_ids {
                resp.prompt_token_ids = seq.request.prompt_token_ids.clone();
            }
            let gap = seq
                .last_token_at
                .map(|t| (now - t).as_secs_f64() / result.tokens.len() as f64);
            match gap {
                None => metrics::histogram!(m::TIME_TO_FIRST_TOKEN_SECONDS).record((now - seq.arrival).as_secs_f64()),
                Some(gap) => {
                    for _ in 0..result.tokens.len() {
                        metrics::histogram!(m::INTER_TOKEN_LATENCY_SECONDS).record(gap);
                    }
                }
            }
            seq.last_token_at = Some(now);
            let mut reason = None;
            let mut detok_error = None;
            for t in &result.tokens {
                seq.token_ids.push(t.token_id);
                resp.token_ids.push(t.token_id);
                if seq.request.logprobs {
                    resp.logprobs.push(t.logprob);
                }
                match seq.output.push(&self.tokenizer, t.token_id) {
                    Ok(delta) => {
                        resp.text.push_str(&delta.text);
                        if delta.finish_reason.is_some() {
                            reason = delta.finish_reason;
                            break;
                        }
                    }
                    Err(e) => {
                        detok_error = Some(Status::internal(e.to_string()));
                        break;
                    }
                }
            }
            if let Some(status) = detok_error {
                finished.push((i, Outcome::Error(status, "detokenize")));
                continue;
            }
            if reason.is_none() {
                let pool = self.pool.as_mut().expect("connected");
                pool.register_full_blocks(&mut seq.table, &seq.token_ids[..seq.num_computed], salt.as_deref());
                pool.truncate(&mut seq.table, seq.num_computed);
            }
            metrics::counter!(m::GENERATED_TOKENS_TOTAL).increment(resp.token_ids.len() as u64);
            if let Some(reason) = reason {
                resp.finish_reason = Sequence::finish_reason_proto(reason) as i32;
                resp.usage = Some(seq.usage());
                resp.speculation = Some(seq.speculation_stats());
                seq.emit(resp);
                finished.push((i, Outcome::Finished(reason)));
            } else if !seq.emit(resp) {
                finished.push((i, Outcome::Finished(FinishReason::Cancelled)));
            }
        }
        for (i, outcome) in finished.into_iter().rev() {
            let seq = self.running.remove(i);
            self.finish_after_step(seq, outcome);
        }
        Ok(())
    }

    /// Ends a sequence whose last response (if any) was already emitted.
    fn finish_after_step(&mut self, seq: Sequence, outcome: Outcome) {
        match outcome {
            Outcome::Finished(FinishReason::Cancelled) => self.finish(seq, outcome),
            Outcome::Finished(reason) => self.release_and_record(seq, reason.as_str()),
            Outcome::Error(..) => self.finish(seq, outcome),
        }
    }

    /// Ends a sequence: sends its final message or error, frees its blocks.
    fn finish(&mut self, mut seq: Sequence, outcome: Outcome) {
        match outcome {
            Outcome::Finished(reason) => {
                let delta = seq.output.finish(&self.tokenizer, reason).unwrap_or_default();
                let resp = pb::GenerateResponse {
                    request_id: seq.request.request_id.clone(),
                    text: delta.text,
                    finish_reason: Sequence::finish_reason_proto(reason) as i32,
                    usage: Some(seq.usage()),
                    speculation: Some(seq.speculation_stats()),
                    ..Default::default()
                };
                seq.emit(resp);
                self.release_and_record(seq, reason.as_str());
            }
            Outcome::Error(status, label) => {
                let _ = seq.pending.take();
                if let Err(mpsc::error::TrySendError::Full(err)) = seq.responses.try_send(Err(status)) {
                    // A slow client still gets the error, after what it has.
                    let tx = seq.responses.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(FINAL_SEND_TIMEOUT, tx.send(err)).await;
                    });
                }
                self.release_and_record(seq, label);
            }
        }
    }

    fn release_and_record(&mut self, mut seq: Sequence, outcome: &'static str) {
        if let Some(pool) = self.pool.as_mut() {
            pool.free_table(&mut seq.table);
        }
        if seq.engine_knows {
            self.to_release.push(seq.seq_id);
        }
        // A final message that did not fit the stream is delivered in order
        // by a task, so a slow client never blocks the scheduler.
        if let Some(pending) = seq.pending.take() {
            let tx = seq.responses.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(FINAL_SEND_TIMEOUT, tx.send(Ok(pending))).await;
            });
        }
        self.shared.load.fetch_sub(1, Ordering::AcqRel);
        metrics::counter!(m::REQUESTS_TOTAL, "outcome" => outcome).increment(1);
        metrics::histogram!(m::REQUEST_DURATION_SECONDS).record(seq.arrival.elapsed().as_secs_f64());
        tracing::debug!(
            engine = self.index,
            request = %seq.request.request_id,
            outcome,
            generated = seq.num_generated(),
            "request finished"
        );
    }

    /// The engine is gone: every request on it fails, accounting resets.
    fn fail_engine(&mut self, status: Status) {
        tracing::warn!(engine = self.index, error = %status.message(), "engine failed; ending its requests");
        self.shared.healthy.store(false, Ordering::Release);
        metrics::gauge!(m::ENGINE_UP, "engine" => self.label.clone()).set(0.0);
        let seqs: Vec<Sequence> = self.running.drain(..).chain(self.waiting.drain(..)).collect();
        for seq in seqs {
            self.finish(seq, Outcome::Error(status.clone(), "unavailable"));
        }
        // Attaching again makes the engine release what it still holds.
        self.to_release.clear();
        self.pool = None;
        self.client = None;
    }

    fn update_gauges(&self) {
        let label = self.label.clone();
        metrics::gauge!(m::REQUESTS_RUNNING, "engine" => label.clone()).set(self.running.len() as f64);
        metrics::gauge!(m::REQUESTS_WAITING, "engine" => label.clone()).set(self.waiting.len() as f64);
        if let Some(pool) = &self.pool {
            metrics::gauge!(m::KV_BLOCKS, "engine" => label.clone(), "state" => "used")
                .set(pool.num_used_blocks() as f64);
            metrics::gauge!(m::KV_BLOCKS, "engine" => label, "state" => "free").set(pool.num_free_blocks() as f64);
        }
    }
}
