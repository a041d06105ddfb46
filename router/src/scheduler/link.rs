//! One scheduler's connection to its engine: the engine's shape (`Info`),
//! this router's KV lease (`Attach`), and the step, release and probe
//! calls, each bounded by a deadline and mapped to a `RouterError`.
//!
//! Invariant: a link exists only while the engine instance it was made for
//! answers; any failure drops it, and a new link re-attaches (the engine
//! then releases whatever it still held for this router's old lease).

use std::sync::OnceLock;
use std::time::Duration;

use heterospec_kv::{BlockPool, BlockPoolConfig};
use heterospec_proto::engine::v1 as epb;
use heterospec_proto::engine::v1::engine_client::EngineClient;
use rand::Rng;
use tonic::transport::{Channel, Endpoint};

use crate::error::RouterError;

/// Deadline of the small control calls (Info, Attach).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest engine message either way (a step of a big batch with logprobs).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// First pause between reconnection attempts, and the most it grows to.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// The id under which scheduler `index` of this router process leases KV
/// on its engine: random per start, distinct per scheduler, so two
/// schedulers never replace each other's lease on one engine.
fn router_id(index: usize) -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    BASE.get_or_init(rand::random).wrapping_add(index as u64)
}

/// `host:pid`, for the engine's logs.
fn router_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "router".into());
    format!("{host}:{}", std::process::id())
}

/// Exponential backoff with full jitter between reconnection attempts.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The pause before the next attempt: uniform in `[min, min·2^n]`,
    /// capped at `RECONNECT_MAX`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = RECONNECT_MIN
            .saturating_mul(1 << self.failures.min(8))
            .min(RECONNECT_MAX);
        self.failures = self.failures.saturating_add(1);
        rand::rng().random_range(RECONNECT_MIN..=ceiling)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A step sent to the engine: its answer (or failure) and when it left.
pub(crate) struct StepCall {
    pub answer: tokio::task::JoinHandle<Result<epb::StepResponse, RouterError>>,
    pub sent: std::time::Instant,
}

/// A connected engine and this router's lease on it.
pub(crate) struct EngineLink {
    client: EngineClient<Channel>,
    /// The number of the next step under this lease (from 1).
    next_step: u64,
    pub instance_id: u64,
    pub lease_id: u64,
    /// Most draft tokens the engine accepts per step.
    pub max_lookahead: usize,
    /// The engine's forward runs on the host's cores (not a GPU).
    pub host_compute: bool,
    /// The engine runs numbered steps in order, continuations, and
    /// releases carried by steps (what overlapping steps needs).
    pub ordered_steps: bool,
    pub block_size: usize,
    /// This router's partition of the engine's blocks, as a fresh pool.
    pub num_kv_blocks: usize,
}

/// Why a connection attempt failed.
pub(crate) enum ConnectError {
    /// The engine does not answer (yet).
    Unreachable,
    /// The engine answers but refuses a lease (all partitions taken).
    LeaseRefused(String),
    /// The engine leased too few blocks to serve anything.
    TooSmall(u32),
}

impl EngineLink {
    /// Asks the engine for its shape and leases a KV partition.
    pub async fn connect(endpoint: &Endpoint, index: usize) -> Result<(EngineLink, epb::InfoResponse), ConnectError> {
        let mut client = EngineClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let info = match tokio::time::timeout(CONTROL_TIMEOUT, client.info(epb::InfoRequest::default())).await {
            Ok(Ok(info)) => info.into_inner(),
            _ => return Err(ConnectError::Unreachable),
        };
        let attach = epb::AttachRequest {
            router_id: router_id(index),
            router_name: router_name(),
        };
        let lease = match tokio::time::timeout(CONTROL_TIMEOUT, client.attach(attach)).await {
            Ok(Ok(lease)) => lease.into_inner(),
            Ok(Err(s)) => return Err(ConnectError::LeaseRefused(s.message().to_string())),
            Err(_) => return Err(ConnectError::Unreachable),
        };
        if lease.num_kv_blocks < 2 {
            return Err(ConnectError::TooSmall(lease.num_kv_blocks));
        }
        let link = EngineLink {
            client,
            next_step: 1,
            instance_id: info.instance_id,
            lease_id: lease.lease_id,
            max_lookahead: info.max_lookahead as usize,
            host_compute: !info.device.starts_with("cuda"),
            ordered_steps: info.ordered_steps,
            block_size: info.block_size as usize,
            num_kv_blocks: lease.num_kv_blocks as usize,
        };
        tracing::info!(
            engine = index,
            model = %info.model,
            blocks = lease.num_kv_blocks,
            partition = lease.partition,
            partitions = lease.num_partitions,
            instance = info.instance_id,
            "connected to engine"
        );
        Ok((link, info))
    }

    /// A fresh block pool for this link's partition.
    pub fn new_pool(&self) -> BlockPool {
        BlockPool::new(BlockPoolConfig {
            num_blocks: self.num_kv_blocks,
            block_size: self.block_size,
        })
    }

    /// Sends one step, the engine forgetting `released` first, answered
    /// within `timeout`. Steps run on the engine in the order they are sent
    /// (they are numbered), so one may be sent before the one before it has
    /// answered.
    pub fn send_step(&mut self, seqs: Vec<epb::SeqStep>, released: Vec<u64>, timeout: Duration) -> StepCall {
        let request = epb::StepRequest {
            seqs,
            instance_id: self.instance_id,
            lease_id: self.lease_id,
            step_number: self.next_step,
            release_seq_ids: released,
        };
        self.next_step += 1;
        let mut client = self.client.clone();
        StepCall {
            answer: tokio::spawn(async move { step(&mut client, request, timeout).await }),
            sent: std::time::Instant::now(),
        }
    }

    /// Checks that the engine answers and is the instance we planned for.
    pub async fn probe(&mut self) -> Result<(), RouterError> {
        let request = epb::InfoRequest {
            lease_id: self.lease_id,
        };
        let info = within(CONTROL_TIMEOUT, "does not answer", self.client.info(request))
            .await?
            .into_inner();
        if info.instance_id != self.instance_id {
            return Err(RouterError::EngineUnavailable("engine restarted".into()));
        }
        Ok(())
    }

    /// Gives this link's lease back to the engine.
    pub async fn detach(&mut self) -> Result<(), RouterError> {
        let request = epb::DetachRequest {
            lease_id: self.lease_id,
        };
        within(CONTROL_TIMEOUT, "detach timed out", self.client.detach(request)).await?;
        Ok(())
    }

    /// Tells the engine to forget `seq_ids`.
    pub async fn release(&mut self, seq_ids: Vec<u64>, timeout: Duration) -> Result<(), RouterError> {
        let request = epb::ReleaseRequest {
            seq_ids,
            lease_id: self.lease_id,
        };
        within(timeout, "release timed out", self.client.release(request)).await?;
        Ok(())
    }
}

/// A control call bounded by `timeout`: a deadline passed (`engine
/// {late}`) or a failed call makes the engine unavailable.
async fn within<T>(
    timeout: Duration,
    late: &str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, RouterError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| RouterError::EngineUnavailable(format!("engine {late}")))?
        .map_err(|s| RouterError::EngineUnavailable(format!("engine failed: {}", s.message())))
}

/// One step call, within `timeout`, its failures mapped to router errors.
async fn step(
    client: &mut EngineClient<Channel>,
    request: epb::StepRequest,
    timeout: Duration,
) -> Result<epb::StepResponse, RouterError> {
    let response = tokio::time::timeout(timeout, client.step(request))
        .await
        .map_err(|_| RouterError::EngineUnavailable("engine step timed out".into()))?
        .map_err(|s| match s.code() {
            tonic::Code::FailedPrecondition => {
                RouterError::EngineUnavailable(format!("engine restarted or KV lease lost: {}", s.message()))
            }
            // A contract violation is our bug, but the engine's state for
            // these sequences is unknown: treat as a failure.
            tonic::Code::InvalidArgument => {
                RouterError::EngineContract(format!("engine refused the step: {}", s.message()))
            }
            _ => RouterError::EngineUnavailable(format!("engine failed: {}", s.message())),
        })?;
    Ok(response.into_inner())
}
