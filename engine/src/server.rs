//! The engine process's gRPC service (`heterospec.engine.v1.Engine`).
//!
//! The model runs on one dedicated OS thread that owns the [`Engine`]
//! (an actor): gRPC handlers send it commands over a channel and await a
//! `oneshot` reply, so the async runtime never blocks on a forward pass and
//! the forward's own thread pool is not oversubscribed. A panic on that
//! thread answers the step and every queued command with `UNAVAILABLE` and
//! ends the thread (see [`crate::health`] for what follows).
//!
//! A lease's numbered steps reach the engine thread in their order
//! (`StepRequest.step_number`), whatever order their calls arrive in: a
//! step waits up to `STEP_ORDER_WAIT` for the one numbered before it, so a
//! router may send step n+1 before step n has answered.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heterospec_kv::BlockId;
use heterospec_proto::engine::v1 as pb;
use heterospec_proto::engine::v1::engine_server::Engine as EngineService;
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::{Request, Response, Status};

use crate::engine::{Engine, SeqId, SeqResult, SeqStep, StepOutcome};
use crate::error::EngineError;
use crate::health::EngineHealth;
use crate::lease::{Leases, Turn};
use crate::metrics;
use crate::sampler::SamplingParams;
use crate::spec::SpecMode;

type StepReply = oneshot::Sender<Result<(StepOutcome, f64), EngineError>>;

/// Commands for the engine thread.
enum Command {
    /// A step (after forgetting the sequences listed), answered with its
    /// outcome and the seconds the engine thread spent on it.
    Step(Vec<SeqStep>, Vec<SeqId>, StepReply),
    Release(Vec<SeqId>, oneshot::Sender<()>),
}

/// Everything `Info` reports, fixed at start-up, and how routers share
/// the engine.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub model: String,
    pub instance_id: u64,
    /// KV partitions, one per router (see [`crate::lease`]).
    pub max_routers: usize,
    /// Silence after which a router's partition may go to another router.
    pub lease_timeout: Duration,
    /// Tests only: the engine thread panics in its step with this number
    /// (1 = the first), to prove what a panic does.
    pub panic_at_step: Option<u64>,
}

/// Cheap handle to the engine thread; the gRPC service.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    info: pb::InfoResponse,
    leases: Arc<Mutex<Leases>>,
    health: Arc<EngineHealth>,
    /// Woken when a numbered step takes its turn (or a lease changes).
    turns: Arc<Notify>,
}

/// How long a numbered step waits for the step numbered before it.
const STEP_ORDER_WAIT: Duration = Duration::from_secs(5);

impl EngineHandle {
    /// Moves `engine` onto its own thread and returns the handle; an error
    /// when its KV blocks cannot be split between `max_routers`.
    pub fn spawn(engine: Engine, info: EngineInfo, health: Arc<EngineHealth>) -> Result<Self, String> {
        let layout = engine.kv_layout();
        let leases = Leases::new(layout.num_blocks, info.max_routers, info.lease_timeout)?;
        let config = engine.model().config().clone();
        let max_lookahead = engine.max_lookahead();
        let device = engine.model().device().to_string();
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        let panic_at_step = info.panic_at_step;
        let thread_health = health.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let mut engine = engine;
                let mut steps = 0u64;
                while let Some(cmd) = rx.blocking_recv() {
                    let panicked = match cmd {
                        Command::Step(seqs, released, reply) => {
                            steps += 1;
                            let start = Instant::now();
                            let num_tokens: usize = seqs
                                .iter()
                                .map(|s| s.new_token_ids.len().max(usize::from(s.continues)))
                                .sum();
                            thread_health.step_started();
                            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                for &id in &released {
                                    // As for Release: an unknown one is harmless.
                                    let _ = engine.release(id);
                                }
                                if panic_at_step == Some(steps) {
                                    panic!("fault injected at step {steps} (--test-panic-at-step)");
                                }
                                engine.step_isolated(&seqs)
                            }));
                            thread_health.step_ended();
                            let elapsed = start.elapsed();
                            metrics::record_step(elapsed, seqs.len(), num_tokens);
                            match result {
                                Ok(result) => {
                                    let _ = reply.send(result.map(|r| (r, elapsed.as_secs_f64())));
                                    None
                                }
                                Err(panic) => {
                                    let message = panic_message(&*panic);
                                    let _ = reply.send(Err(EngineError::Panicked(message.clone())));
                                    Some(message)
                                }
                            }
                        }
                        Command::Release(ids, reply) => {
                            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                for id in ids {
                                    // Releasing an unknown sequence is harmless here:
                                    // the router may release one that never ran.
                                    let _ = engine.release(id);
                                }
                            }));
                            let _ = reply.send(());
                            result.err().map(|panic| panic_message(&*panic))
                        }
                    };
                    if let Some(message) = panicked {
                        tracing::error!(panic = %message, "the engine thread panicked");
                        thread_health.set_dead();
                        // Answer what is queued; dropping a release's reply
                        // reads as "engine thread stopped".
                        rx.close();
                        while let Ok(cmd) = rx.try_recv() {
                            if let Command::Step(_, _, reply) = cmd {
                                let _ = reply.send(Err(EngineError::Panicked(message.clone())));
                            }
                        }
                        return;
                    }
                }
                thread_health.set_dead();
            })
            .expect("spawning the engine thread");
        Ok(EngineHandle {
            commands: tx,
            info: pb::InfoResponse {
                model: info.model,
                block_size: layout.block_size as u32,
                num_kv_blocks: layout.num_blocks as u32,
                vocab_size: config.vocab_size as u32,
                max_context: config.max_context as u32,
                instance_id: info.instance_id,
                max_lookahead: max_lookahead as u32,
                device,
                ordered_steps: true,
            },
            leases: Arc::new(Mutex::new(leases)),
            health,
            turns: Arc::new(Notify::new()),
        })
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a call under `lease_id`; the guard ends it.
    fn begin(&self, lease_id: u64) -> Result<LeaseCall<'_>, Status> {
        let partition = self
            .leases()
            .begin(lease_id, Instant::now())
            .ok_or_else(|| lease_lost(lease_id))?;
        Ok(LeaseCall {
            handle: self,
            lease_id,
            partition,
        })
    }

    /// Hands a step of `call`'s lease to the engine thread in the lease's
    /// step order: when it is step `number`'s turn, it is converted and
    /// queued in the same critical section; it waits for the step before
    /// it at most `STEP_ORDER_WAIT`.
    async fn queue_step(
        &self,
        call: &LeaseCall<'_>,
        number: u64,
        seqs: Vec<pb::SeqStep>,
        released: Vec<u64>,
    ) -> Result<oneshot::Receiver<Result<(StepOutcome, f64), EngineError>>, Status> {
        let (reply, answer) = oneshot::channel();
        let mut work = Some((seqs, released, reply));
        let deadline = tokio::time::Instant::now() + STEP_ORDER_WAIT;
        loop {
            let turn = self.turns.notified();
            tokio::pin!(turn);
            turn.as_mut().enable();
            let mut permit = Some(
                self.commands
                    .reserve()
                    .await
                    .map_err(|_| Status::unavailable("engine thread stopped"))?,
            );
            let queued = {
                let mut leases = self.leases();
                match leases.take_turn(call.lease_id, number) {
                    None => return Err(lease_lost(call.lease_id)),
                    Some(Turn::Past) => {
                        return Err(Status::invalid_argument(format!(
                            "step {number} of lease {} was already run",
                            call.lease_id
                        )))
                    }
                    Some(Turn::Later) => None,
                    Some(Turn::Now) => {
                        let (seqs, released, reply) = work.take().expect("queued once");
                        Some(
                            step_from_proto(seqs, released, call.partition, &leases).map(|(steps, released)| {
                                let ran: Vec<u64> = steps.iter().map(|s| s.seq_id.0).collect();
                                let gone: Vec<u64> = released.iter().map(|s| s.0).collect();
                                leases.track(call.lease_id, &ran, &gone);
                                let permit = permit.take().expect("reserved above");
                                permit.send(Command::Step(steps, released, reply));
                            }),
                        )
                    }
                }
            };
            // A step waiting for its turn holds no place in the queue.
            drop(permit);
            match queued {
                Some(queued) => {
                    // The next step may be waiting (also when this one was refused).
                    self.turns.notify_waiters();
                    return queued.map(|()| answer);
                }
                None if tokio::time::timeout_at(deadline, turn).await.is_err() => {
                    return Err(Status::failed_precondition(format!(
                        "step {number} of lease {} arrived, but step {} did not within {STEP_ORDER_WAIT:?}",
                        call.lease_id,
                        number - 1
                    )));
                }
                None => {}
            }
        }
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("engine thread stopped"))?;
        rx.await.map_err(|_| Status::unavailable("engine thread stopped"))
    }
}

/// The text a panic carried.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn lease_lost(lease_id: u64) -> Status {
    Status::failed_precondition(format!(
        "KV lease {lease_id} is not held (expired or replaced): attach again"
    ))
}

/// A call under a lease, ended when dropped.
struct LeaseCall<'a> {
    handle: &'a EngineHandle,
    lease_id: u64,
    partition: usize,
}

impl Drop for LeaseCall<'_> {
    fn drop(&mut self) {
        self.handle.leases().end(self.lease_id, Instant::now());
    }
}

/// Most alternatives a sequence may ask for with each token.
const MAX_TOP_LOGPROBS: usize = 20;

/// A router's step and the sequences to forget before it, in engine terms.
fn step_from_proto(
    seqs: Vec<pb::SeqStep>,
    released: Vec<u64>,
    partition: usize,
    leases: &Leases,
) -> Result<(Vec<SeqStep>, Vec<SeqId>), Status> {
    let steps = seqs
        .into_iter()
        .map(|s| seq_step_from_proto(s, partition, leases))
        .collect::<Result<Vec<SeqStep>, Status>>()?;
    let released = released
        .into_iter()
        .map(|id| Leases::engine_seq(partition, id).map(SeqId))
        .collect::<Result<Vec<SeqId>, String>>()
        .map_err(Status::invalid_argument)?;
    Ok((steps, released))
}

/// A router's step in engine terms: its partition's sequence and block ids.
fn seq_step_from_proto(s: pb::SeqStep, partition: usize, leases: &Leases) -> Result<SeqStep, Status> {
    let seq_id = Leases::engine_seq(partition, s.seq_id).map_err(Status::invalid_argument)?;
    let block_table = s
        .block_table
        .iter()
        .map(|&b| leases.engine_block(partition, b).map(BlockId))
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| Status::invalid_argument(format!("sequence {}: {e}", s.seq_id)))?;
    let speculation = SpecMode::from_proto(s.speculation).ok_or_else(|| {
        Status::invalid_argument(format!(
            "sequence {}: unknown speculation mode {}",
            s.seq_id, s.speculation
        ))
    })?;
    Ok(SeqStep {
        seq_id: SeqId(seq_id),
        new_token_ids: s.new_token_ids,
        num_computed: s.num_computed as usize,
        block_table,
        sampling: s.sampling.map(|p| SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
            top_logprobs: (p.top_logprobs as usize).min(MAX_TOP_LOGPROBS),
        }),
        cached_token_ids: s.cached_token_ids,
        sample: s.sample,
        speculation,
        lookahead: s.lookahead as usize,
        continues: s.continues,
    })
}

fn seq_result_to_proto(r: SeqResult) -> pb::SeqResult {
    pb::SeqResult {
        seq_id: Leases::router_seq(r.seq_id.0),
        tokens: r
            .tokens
            .into_iter()
            .map(|t| pb::CommittedToken {
                token_id: t.token_id,
                logprob: t.logprob,
                top_token_ids: t.top.iter().map(|a| a.0).collect(),
                top_logprobs: t.top.iter().map(|a| a.1).collect(),
            })
            .collect(),
        tier: r.spec.tier.map_or(0, |t| t as u32 + 1),
        num_draft_tokens: r.spec.num_draft_tokens as u32,
        num_accepted_tokens: r.spec.num_accepted_tokens as u32,
        speculated: r.spec.speculated,
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::BadSequence { .. } | EngineError::BadStep(_) | EngineError::Config(_) => {
                Status::invalid_argument(e.to_string())
            }
            // Details stay in the engine's log.
            EngineError::Panicked(_) => Status::unavailable("the engine failed and is restarting"),
            _ => Status::internal(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl EngineService for EngineHandle {
    async fn info(&self, request: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        if self.commands.is_closed() {
            return Err(Status::unavailable("engine thread stopped"));
        }
        let lease_id = request.into_inner().lease_id;
        if lease_id != 0 && !self.leases().renew(lease_id, Instant::now()) {
            return Err(lease_lost(lease_id));
        }
        Ok(Response::new(self.info.clone()))
    }

    async fn attach(&self, request: Request<pb::AttachRequest>) -> Result<Response<pb::AttachResponse>, Status> {
        let request = request.into_inner();
        let (grant, blocks, partitions) = {
            let mut leases = self.leases();
            let grant = leases.attach(request.router_id, Instant::now());
            (grant, leases.blocks_per_partition(), leases.num_partitions())
        };
        // Steps waiting under a replaced lease stop waiting.
        self.turns.notify_waiters();
        let grant = grant.ok_or_else(|| {
            Status::resource_exhausted(format!(
                "all {partitions} KV partitions of this engine are leased to other routers (engine --max-routers {partitions})"
            ))
        })?;
        tracing::info!(
            router = %request.router_name,
            partition = grant.partition,
            lease = grant.lease_id,
            blocks,
            released = grant.stale.len(),
            "router attached"
        );
        if !grant.stale.is_empty() {
            let ids = grant.stale.into_iter().map(SeqId).collect();
            self.call(|reply| Command::Release(ids, reply)).await?;
        }
        Ok(Response::new(pb::AttachResponse {
            lease_id: grant.lease_id,
            num_kv_blocks: blocks as u32 + 1,
            partition: grant.partition as u32,
            num_partitions: partitions as u32,
        }))
    }

    async fn step(&self, request: Request<pb::StepRequest>) -> Result<Response<pb::StepResponse>, Status> {
        let request = request.into_inner();
        if request.instance_id != self.info.instance_id {
            return Err(Status::failed_precondition(format!(
                "step planned for engine instance {}, this is {}",
                request.instance_id, self.info.instance_id
            )));
        }
        let call = self.begin(request.lease_id)?;
        let answer = self
            .queue_step(&call, request.step_number, request.seqs, request.release_seq_ids)
            .await?;
        let ((results, failed), engine_seconds) = answer
            .await
            .map_err(|_| Status::unavailable("engine thread stopped"))??;
        if !failed.is_empty() {
            // The engine forgot them: so does the lease.
            let ids: Vec<u64> = failed.iter().map(|(id, _)| id.0).collect();
            self.leases().track(call.lease_id, &[], &ids);
        }
        let failures = failed
            .into_iter()
            .map(|(id, reason)| pb::SeqFailure {
                seq_id: Leases::router_seq(id.0),
                reason,
            })
            .collect();
        Ok(Response::new(pb::StepResponse {
            seqs: results.into_iter().map(seq_result_to_proto).collect(),
            failures,
            engine_seconds,
        }))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let request = request.into_inner();
        let call = self.begin(request.lease_id)?;
        let ids = request
            .seq_ids
            .into_iter()
            .map(|id| Leases::engine_seq(call.partition, id))
            .collect::<Result<Vec<u64>, String>>()
            .map_err(Status::invalid_argument)?;
        self.leases().track(call.lease_id, &[], &ids);
        self.call(|reply| Command::Release(ids.into_iter().map(SeqId).collect(), reply))
            .await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn detach(&self, request: Request<pb::DetachRequest>) -> Result<Response<pb::DetachResponse>, Status> {
        let lease_id = request.into_inner().lease_id;
        let seqs = self.leases().detach(lease_id).ok_or_else(|| lease_lost(lease_id))?;
        self.turns.notify_waiters();
        tracing::info!(lease = lease_id, released = seqs.len(), "router detached");
        if !seqs.is_empty() {
            self.call(|reply| Command::Release(seqs.into_iter().map(SeqId).collect(), reply))
                .await?;
        }
        Ok(Response::new(pb::DetachResponse {}))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            serving: !self.commands.is_closed() && self.health.ready(),
        }))
    }
}
