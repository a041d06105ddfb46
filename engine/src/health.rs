//! What the engine's probes report, kept true while it runs.
//!
//! Readiness (`grpc.health.v1` service `""` and the engine service's name)
//! is SERVING only while the model is loaded, the engine thread lives and
//! no step has run longer than the step timeout; liveness (`"liveness"`)
//! drops only when the thread has died or a step is overdue (a wedged
//! engine), so a loading engine is not restarted. A panic on the engine
//! thread is crash-only: the thread answers what it holds with an error,
//! the probes turn NOT_SERVING, and the process exits non-zero so that the
//! orchestrator restarts it.
//!
//! Invariant: readiness implies liveness, and neither is reported
//! SERVING once the engine thread has ended.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// How often the probes' status follows the engine.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);
/// Exit status of a process whose engine thread panicked.
pub const PANIC_EXIT_CODE: i32 = 70;
/// How long the in-flight replies get to leave before such an exit.
const PANIC_EXIT_GRACE: Duration = Duration::from_millis(500);

/// The engine's state as far as probes are concerned.
pub struct EngineHealth {
    epoch: Instant,
    step_timeout: Duration,
    loaded: AtomicBool,
    dead: AtomicBool,
    /// Milliseconds after `epoch` + 1 at which the running step began; 0
    /// while no step runs.
    step_began: AtomicU64,
}

impl EngineHealth {
    pub fn new(step_timeout: Duration) -> Self {
        EngineHealth {
            epoch: Instant::now(),
            step_timeout,
            loaded: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            step_began: AtomicU64::new(0),
        }
    }

    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }

    /// The engine thread has ended (panicked, or its channel closed).
    pub fn set_dead(&self) {
        self.dead.store(true, Ordering::Release);
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub fn step_started(&self) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.step_began.store(now, Ordering::Release);
    }

    pub fn step_ended(&self) {
        self.step_began.store(0, Ordering::Release);
    }

    /// A step has run longer than the step timeout.
    pub fn step_overdue(&self) -> bool {
        match self.step_began.load(Ordering::Acquire) {
            0 => false,
            began => {
                let now = self.epoch.elapsed().as_millis() as u64 + 1;
                Duration::from_millis(now.saturating_sub(began)) > self.step_timeout
            }
        }
    }

    /// Alive: not dead and not wedged in a step.
    pub fn live(&self) -> bool {
        !self.is_dead() && !self.step_overdue()
    }

    /// Ready for steps: alive and loaded.
    pub fn ready(&self) -> bool {
        self.live() && self.loaded.load(Ordering::Acquire)
    }

    /// Keeps `reporter` in step with this state: `""` and `service` follow
    /// readiness, `"liveness"` liveness. After the engine thread died the
    /// process exits with [`PANIC_EXIT_CODE`] (in-flight replies first).
    pub async fn report(&self, reporter: HealthReporter, service: &'static str) {
        let status = |ok: bool| {
            if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        let mut last = None;
        loop {
            let now = (self.ready(), self.live());
            if last != Some(now) {
                tracing::info!(ready = now.0, live = now.1, "engine health");
                reporter.set_service_status("", status(now.0)).await;
                reporter.set_service_status(service, status(now.0)).await;
                reporter.set_service_status("liveness", status(now.1)).await;
                last = Some(now);
            }
            if self.is_dead() {
                tokio::time::sleep(PANIC_EXIT_GRACE).await;
                tracing::error!("the engine thread has died: exiting so that the engine is restarted");
                std::process::exit(PANIC_EXIT_CODE);
            }
            tokio::time::sleep(REPORT_INTERVAL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_loaded_live_engine_without_an_overdue_step() {
        let health = EngineHealth::new(Duration::from_millis(30));
        assert!(health.live() && !health.ready(), "loading: alive, not ready");
        health.set_loaded();
        assert!(health.ready());
        health.step_started();
        assert!(health.ready(), "a step within the timeout");
        std::thread::sleep(Duration::from_millis(60));
        assert!(health.step_overdue() && !health.ready() && !health.live());
        health.step_ended();
        assert!(health.ready(), "the step finished");
        health.set_dead();
        assert!(!health.ready() && !health.live());
    }
}
