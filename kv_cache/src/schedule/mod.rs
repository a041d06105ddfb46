//! The scheduling core: one synchronous state machine that plans engine
//! steps over a [`BlockPool`](crate::BlockPool) and applies what the engine
//! committed. The router's scheduler, the in-process runner and local
//! generation all drive it; they own the transport, the payloads (response
//! channels, output streams, timestamps) and the metrics, this module owns
//! the waiting queue, the running set and every block of every sequence.
//!
//! A step is `schedule` (plan), the caller's engine call, then `update`
//! (commit). Between steps the caller may `cancel` sequences, `add` new
//! ones and send the engine `take_released` ids to forget. While a step of
//! steady decoding is in flight, `schedule_ahead` plans the next one (the
//! caller sends it before applying the first); each `update` then applies
//! the oldest step in flight, and `schedule` waits until none is.
//!
//! Invariants (between steps):
//! - every waiting sequence has an empty block table; a running one holds
//!   blocks for at least its `num_computed` tokens, and exactly
//!   `blocks_for(num_computed)` after an `update` that leaves no run of it
//!   in flight (lookahead given back);
//! - `num_computed < token_ids.len()` for a running sequence: the last known
//!   token is always still to be run (it yields the next sample);
//! - a seq id is known to the engine only between its first committed run
//!   and its release; a preempted sequence gets a new id, so the engine never
//!   sees stale positions under an id it knows;
//! - `running` is in admission order (newest last): preemption takes the
//!   newest, so the oldest requests always make progress.
//!
//! Slot layout of one run (block size 4; `c` computed, `n` the run's new
//! tokens, `l` lookahead slots reserved for accepted draft tokens):
//!
//! ```text
//!  plan:    position  0 1 2 3 | 4 5 6 7 | 8 9 . .
//!                     c c c c   c n n l   l l
//!                               ^num_computed=5, run n=2 ends the known
//!                                tokens (sample), lookahead 3 -> 10 slots
//!  commit:  k = 3 tokens committed (2 drafts accepted + 1 sampled):
//!                     c c c c   c n n a   a s
//!                     KV holds the run and every committed token but the
//!                     last: num_computed = 5 + 2 + 3 - 1 = 9; `s` is known
//!                     (token_ids grows by 3) and runs next step
//!  truncate: blocks beyond blocks_for(9) = 3 go back to the pool; the full
//!            blocks of computed tokens are registered for prefix caching
//! ```

mod config;
mod scheduler;
mod sequence;
mod step;
#[cfg(test)]
mod tests;

pub use config::{ScheduleConfig, ScheduleError};
pub use scheduler::Scheduler;
pub use sequence::{NewSequence, SeqId, Sequence};
pub use step::{Admission, CommittedRun, Finished, Schedule, ScheduledRun, Verdict};
