//! The engine process's gRPC service (`heterospec.engine.v1.Engine`).
//!
//! The model runs on one dedicated OS thread that owns the [`Engine`]
//! (an actor): gRPC handlers send it commands over a channel and await a
//! `oneshot` reply, so the async runtime never blocks on a forward pass and
//! the forward's own thread pool is not oversubscribed.

use std::time::Instant;

use heterospec_kv::BlockId;
use heterospec_proto::engine::v1 as pb;
use heterospec_proto::engine::v1::engine_server::{Engine as EngineService, EngineServer};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::engine::{Engine, SeqId, SeqResult, SeqStep};
use crate::error::EngineError;
use crate::metrics;
use crate::sampler::SamplingParams;
use crate::spec::SpecMode;

/// Commands for the engine thread.
enum Command {
    Step(Vec<SeqStep>, oneshot::Sender<Result<Vec<SeqResult>, EngineError>>),
    Release(Vec<SeqId>, oneshot::Sender<()>),
}

/// Everything `Info` reports, fixed at start-up.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub model: String,
    pub instance_id: u64,
}

/// Cheap handle to the engine thread; the gRPC service.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    info: pb::InfoResponse,
}

impl EngineHandle {
    /// Moves `engine` onto its own thread and returns the handle.
    pub fn spawn(engine: Engine, info: EngineInfo) -> Self {
        let layout = engine.kv_layout();
        let config = engine.model().config().clone();
        let max_lookahead = engine.max_lookahead();
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let mut engine = engine;
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Command::Step(seqs, reply) => {
                            let start = Instant::now();
                            let num_tokens: usize = seqs.iter().map(|s| s.new_token_ids.len()).sum();
                            let result = engine.step(&seqs);
                            metrics::record_step(start.elapsed(), seqs.len(), num_tokens);
                            let _ = reply.send(result);
                        }
                        Command::Release(ids, reply) => {
                            for id in ids {
                                // Releasing an unknown sequence is harmless here:
                                // the router may release one that never ran.
                                let _ = engine.release(id);
                            }
                            let _ = reply.send(());
                        }
                    }
                }
            })
            .expect("spawning the engine thread");
        EngineHandle {
            commands: tx,
            info: pb::InfoResponse {
                model: info.model,
                block_size: layout.block_size as u32,
                num_kv_blocks: layout.num_blocks as u32,
                vocab_size: config.vocab_size as u32,
                max_context: config.max_context as u32,
                instance_id: info.instance_id,
                max_lookahead: max_lookahead as u32,
            },
        }
    }

    pub fn into_service(self) -> EngineServer<Self> {
        EngineServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
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

fn seq_step_from_proto(s: pb::SeqStep) -> Result<SeqStep, Status> {
    let speculation = SpecMode::from_proto(s.speculation).ok_or_else(|| {
        Status::invalid_argument(format!(
            "sequence {}: unknown speculation mode {}",
            s.seq_id, s.speculation
        ))
    })?;
    Ok(SeqStep {
        seq_id: SeqId(s.seq_id),
        new_token_ids: s.new_token_ids,
        num_computed: s.num_computed as usize,
        block_table: s.block_table.into_iter().map(BlockId).collect(),
        sampling: s.sampling.map(|p| SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
        }),
        cached_token_ids: s.cached_token_ids,
        sample: s.sample,
        speculation,
        lookahead: s.lookahead as usize,
    })
}

fn seq_result_to_proto(r: SeqResult) -> pb::SeqResult {
    pb::SeqResult {
        seq_id: r.seq_id.0,
        tokens: r
            .tokens
            .into_iter()
            .map(|t| pb::CommittedToken {
                token_id: t.token_id,
                logprob: t.logprob,
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
            EngineError::BadSequence { .. } | EngineError::Config(_) | EngineError::ContextOverflow { .. } => {
                Status::invalid_argument(e.to_string())
            }
            _ => Status::internal(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl EngineService for EngineHandle {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        if self.commands.is_closed() {
            return Err(Status::unavailable("engine thread stopped"));
        }
        Ok(Response::new(self.info.clone()))
    }

    async fn step(&self, request: Request<pb::StepRequest>) -> Result<Response<pb::StepResponse>, Status> {
        let request = request.into_inner();
        if request.instance_id != self.info.instance_id {
            return Err(Status::failed_precondition(format!(
                "step planned for engine instance {}, this is {}",
                request.instance_id, self.info.instance_id
            )));
        }
        let seqs = request
            .seqs
            .into_iter()
            .map(seq_step_from_proto)
            .collect::<Result<Vec<SeqStep>, Status>>()?;
        let results = self.call(|reply| Command::Step(seqs, reply)).await??;
        Ok(Response::new(pb::StepResponse {
            seqs: results.into_iter().map(seq_result_to_proto).collect(),
        }))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let ids = request.into_inner().seq_ids.into_iter().map(SeqId).collect();
        self.call(|reply| Command::Release(ids, reply)).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            serving: !self.commands.is_closed(),
        }))
    }
}
