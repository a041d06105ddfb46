//! Sending steps: the step call itself (with the ids to forget riding on
//! it for an engine that runs steps in order), whether to overlap steps,
//! and the Release call.
//!
//! Invariant: an id goes to the engine to forget only once the core has
//! released it, so no step in flight still runs it.

use heterospec_kv::schedule::ScheduledRun;
use heterospec_proto::engine::v1 as epb;

use super::link::EngineLink;
use super::{OverlapSteps, Scheduler};
use crate::error::RouterError;

impl Scheduler {
    pub(super) fn link(&self) -> &EngineLink {
        &self.conn.as_ref().expect("connected").link
    }

    /// Whether to plan the next step while this one runs (never with an
    /// engine that cannot run steps in order).
    pub(super) fn overlaps(&self) -> bool {
        let link = self.link();
        let (ordered, host_compute) = (link.ordered_steps, link.host_compute);
        ordered
            && match self.config.overlap_steps {
                OverlapSteps::On => true,
                OverlapSteps::Off => false,
                OverlapSteps::Auto => !host_compute,
            }
    }

    /// Sends the engine `runs` of the core's plan.
    pub(super) fn send(&mut self, runs: Vec<ScheduledRun>) {
        let core = self.core();
        let steps: Vec<epb::SeqStep> = runs
            .into_iter()
            .map(|run| {
                let request = &core.get(run.seq_id).expect("scheduled").payload.request;
                epb::SeqStep {
                    seq_id: run.seq_id.0,
                    new_token_ids: run.new_token_ids,
                    num_computed: run.num_computed as u32,
                    block_table: run.block_table.iter().map(|b| b.0).collect(),
                    sampling: run.first_run.then_some(request.sampling),
                    cached_token_ids: run.cached_token_ids,
                    sample: run.sample,
                    speculation: request.speculation as i32,
                    lookahead: run.lookahead as u32,
                    continues: run.continues,
                }
            })
            .collect();
        // An engine that runs steps in order forgets what has ended before
        // this step (every run of those ids is done by then).
        let released = match self.link().ordered_steps {
            true => self.take_releases(),
            false => Vec::new(),
        };
        let timeout = self.config.step_timeout;
        let call = self
            .conn
            .as_mut()
            .expect("connected")
            .link
            .send_step(steps, released, timeout);
        self.in_flight.push_back(call);
    }

    /// The ids the engine should forget now: the core's, and any left
    /// from a release that could not be sent.
    fn take_releases(&mut self) -> Vec<u64> {
        let released = self.core().take_released();
        self.to_release.extend(released.iter().map(|id| id.0));
        std::mem::take(&mut self.to_release)
    }

    /// Drops the steps in flight (their engine is gone, or we stop).
    pub(super) fn abandon_in_flight(&mut self) {
        for call in self.in_flight.drain(..) {
            call.answer.abort();
        }
    }

    /// Sends the engine the ids it should forget through the Release call:
    /// for an engine that cannot take them with its steps, or with no step
    /// in flight.
    pub(super) async fn release_pending(&mut self) -> Result<(), RouterError> {
        let ids = self.take_releases();
        if ids.is_empty() {
            return Ok(());
        }
        let timeout = self.config.step_timeout;
        self.conn.as_mut().expect("connected").link.release(ids, timeout).await
    }
}
