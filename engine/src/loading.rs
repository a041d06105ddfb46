//! The engine's gRPC service from the moment its port opens: while the
//! model loads every call is `UNAVAILABLE` ("loading") and the health
//! service says NOT_SERVING, so probes and routers see the truth instead of
//! a closed port; once loaded, calls go to the [`EngineHandle`].
//!
//! Invariant: the slot is filled once, by the process after loading.

use std::sync::{Arc, OnceLock};

use heterospec_proto::engine::v1 as pb;
use heterospec_proto::engine::v1::engine_server::{Engine as EngineService, EngineServer};
use tonic::{Request, Response, Status};

use crate::server::EngineHandle;

/// Largest engine message either way (a big batch's step with logprobs).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The engine service, loaded or not.
#[derive(Clone, Default)]
pub struct EngineSlot {
    handle: Arc<OnceLock<EngineHandle>>,
}

impl EngineSlot {
    /// Serves `handle` from now on (a second call changes nothing).
    pub fn fill(&self, handle: EngineHandle) {
        let _ = self.handle.set(handle);
    }

    pub fn into_service(self) -> EngineServer<Self> {
        EngineServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn get(&self) -> Result<&EngineHandle, Status> {
        self.handle
            .get()
            .ok_or_else(|| Status::unavailable("the engine is loading its model"))
    }
}

#[tonic::async_trait]
impl EngineService for EngineSlot {
    async fn info(&self, r: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        self.get()?.info(r).await
    }

    async fn attach(&self, r: Request<pb::AttachRequest>) -> Result<Response<pb::AttachResponse>, Status> {
        self.get()?.attach(r).await
    }

    async fn step(&self, r: Request<pb::StepRequest>) -> Result<Response<pb::StepResponse>, Status> {
        self.get()?.step(r).await
    }

    async fn release(&self, r: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.get()?.release(r).await
    }

    async fn detach(&self, r: Request<pb::DetachRequest>) -> Result<Response<pb::DetachResponse>, Status> {
        self.get()?.detach(r).await
    }

    async fn health(&self, r: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        match self.handle.get() {
            Some(handle) => handle.health(r).await,
            None => Ok(Response::new(pb::HealthResponse { serving: false })),
        }
    }
}
