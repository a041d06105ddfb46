//! CUDA graphs: a forward of up to [`MAX_GRAPH_TOKENS`] tokens (the
//! target's here, a draft head's tree layer in `head`) is padded to its
//! bucket, its inputs are written into buffers that persist, and the
//! bucket's launches, captured the first time it is seen
//! ([`GraphCache`]), are replayed in one call instead of being queued one
//! by one (about a dozen launches per layer).
//!
//! Buckets are powers of two up to one GEMM row tile (64), then whole
//! tiles, so padding never adds a GEMM tile; a padding row (`HostInputs::
//! pad_to`) changes no real row, so a replay gives the eager forward's
//! bits. One set of buffers, sized for the largest bucket seen, serves
//! every graph of its owner: replays are queued one at a time on one
//! stream.
//!
//! Invariant: a graph reads and writes only its owner's shared buffers,
//! the weights, the KV storage its cache is tied to (`tie`: buffers and
//! block size baked in) and, for a head, its feature store; when any of
//! these is replaced (the buffers grow, another KV storage comes, a head
//! makes a new store), every graph is dropped before anything replays.

use std::collections::HashMap;
use std::hash::Hash;

use super::forward::{launch, Buffers, Shape};
use super::layer::{HostInputs, StepInputs};
use super::{int, Backend, DeviceKv, GpuModel, TILE};
use crate::error::Result;

/// The most tokens a forward (or a head's tree layer) run from a graph
/// has (larger ones are queued launch by launch: their kernels dwarf the
/// launches).
pub const MAX_GRAPH_TOKENS: usize = 512;
/// The most graphs kept; past it, all are dropped and captured again
/// (buckets of tokens x of rows x layer counts x feature taps).
const MAX_GRAPHS: usize = 256;
/// Ints the first block-table and key-list buffers hold.
const FIRST_KEY_LENS: usize = 4096;

/// The padded count of `n` tokens or rows.
pub(super) fn bucket(n: usize) -> usize {
    match n {
        0 => 0,
        n if n <= TILE => n.next_power_of_two(),
        n => n.next_multiple_of(TILE),
    }
}

/// Captured launch sequences by key, over buffers their owner keeps.
pub(super) struct GraphCache<B: Backend, K> {
    /// Whether launches run from graphs (off: each is queued).
    enabled: bool,
    /// What the graphs write besides their owner's buffers (a KV
    /// storage's id; 0: nothing yet).
    tie: u64,
    graphs: HashMap<K, B::Graph>,
    /// Captures made so far.
    pub captures: usize,
}

impl<B: Backend, K: Hash + Eq + Copy> GraphCache<B, K> {
    pub fn new(enabled: bool) -> Self {
        GraphCache {
            enabled,
            tie: 0,
            graphs: HashMap::new(),
            captures: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns graphs on or off (off drops them).
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.clear();
        }
    }

    /// Drops every graph (their buffers are about to go).
    pub fn clear(&mut self) {
        self.graphs.clear();
    }

    /// Drops every graph unless they were captured writing `tie`.
    pub fn tie_to(&mut self, tie: u64) {
        if self.tie != tie {
            self.clear();
            self.tie = tie;
        }
    }

    /// Replays `key`'s graph, capturing `launches` first when it is new.
    /// `false`: the capture failed, graphs are off from now on, and the
    /// caller queues the launches itself.
    pub fn replay(&mut self, b: &B, key: K, launches: &mut dyn FnMut() -> Result<()>) -> Result<bool> {
        if !self.graphs.contains_key(&key) {
            if self.graphs.len() >= MAX_GRAPHS {
                self.clear();
            }
            match b.capture(launches) {
                Ok(graph) => {
                    self.graphs.insert(key, graph);
                    self.captures += 1;
                }
                Err(e) => {
                    tracing::warn!("capturing launches into a CUDA graph failed ({e}); they run eagerly from now on");
                    self.set_enabled(false);
                    return Ok(false);
                }
            }
        }
        b.replay(&self.graphs[&key])?;
        Ok(true)
    }
}

/// The captured forwards of one model, by shape, and their buffers.
pub(super) struct Graphs<B: Backend> {
    cache: GraphCache<B, Shape>,
    shared: Option<Buffers<B>>,
}

impl<B: Backend> Graphs<B> {
    pub fn new(enabled: bool) -> Self {
        Graphs {
            cache: GraphCache::new(enabled),
            shared: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.cache.enabled()
    }

    /// Turns graphs on or off; off drops them and their buffers.
    pub fn set_enabled(&mut self, on: bool) {
        self.cache.set_enabled(on);
        if !on {
            self.shared = None;
        }
    }

    /// Captures made so far.
    pub fn captures(&self) -> usize {
        self.cache.captures
    }

    /// Whether a forward of `n` tokens runs from a graph (one that copies
    /// layer taps to the host between layers never does).
    pub fn takes(&self, n: usize, layer_taps: bool) -> bool {
        self.enabled() && (1..=MAX_GRAPH_TOKENS).contains(&n) && !layer_taps
    }

    /// Runs the forward of `host` at `shape` (its exact counts) from its
    /// bucket's graph, capturing it first when new. The buffers returned
    /// hold the real rows' logits first, and the real tokens' final-norm
    /// states first. `None`: the capture failed, graphs are now off, and
    /// the caller runs the forward eagerly.
    pub fn run(
        &mut self,
        model: &GpuModel<B>,
        kv: &mut DeviceKv<B>,
        host: &HostInputs,
        logits_rows: &[usize],
        shape: Shape,
    ) -> Result<Option<&Buffers<B>>> {
        let b = &*model.backend;
        self.cache.tie_to(kv.id);
        let padded = Shape {
            tokens: bucket(shape.tokens),
            rows: bucket(shape.rows),
            ..shape
        };
        let mut host = host.clone();
        host.pad_to(padded.tokens);
        let mut rows: Vec<i32> = logits_rows.iter().map(|&r| int(r)).collect();
        rows.resize(padded.rows, 0);
        let fits = self
            .shared
            .as_ref()
            .is_some_and(|s| s.tokens >= padded.tokens && s.rows >= padded.rows && s.step.fits(&host));
        if !fits {
            self.grow(model, kv.block_size, padded, &host)?;
        }
        let buf = self.shared.as_mut().expect("made by grow");
        buf.step.write(b, &host)?;
        buf.write_rows(b, &rows)?;
        if !self
            .cache
            .replay(b, padded, &mut || launch(model, kv, buf, padded, None))?
        {
            self.shared = None;
            return Ok(None);
        }
        Ok(self.shared.as_ref())
    }

    /// Replaces the shared buffers with ones that hold `padded` and
    /// `host`'s key lists (twice them, for the contexts still to grow),
    /// and at least what the old ones held; drops every graph.
    fn grow(&mut self, model: &GpuModel<B>, block_size: usize, padded: Shape, host: &HostInputs) -> Result<()> {
        let (b, c) = (&*model.backend, &model.config);
        let old = self.shared.take();
        self.cache.clear();
        let tokens = room(padded.tokens, old.as_ref().map(|o| o.tokens));
        let rows = room(padded.rows, old.as_ref().map(|o| o.rows));
        let lens = key_room(host, old.as_ref().map(|o| o.step.lens()));
        drop(old);
        let step = StepInputs::reserve(b, c, block_size, tokens, lens)?;
        self.shared = Some(Buffers::up_to(b, c, step, tokens, rows)?);
        Ok(())
    }
}

/// Room for `padded` tokens or rows: one GEMM row tile at least (growing
/// within it would only recapture), and what the old buffers held.
pub(super) fn room(padded: usize, old: Option<usize>) -> usize {
    padded.max(TILE).max(old.unwrap_or(0))
}

/// Room for `host`'s block tables and key lists: twice them (for the
/// contexts still to grow), [`FIRST_KEY_LENS`] at least, and what the old
/// buffers held.
pub(super) fn key_room(host: &HostInputs, old: Option<(usize, usize)>) -> (usize, usize) {
    let (tables, lists) = host.key_lens();
    let at_least = |now: usize, old: usize| (2 * now).max(FIRST_KEY_LENS).max(old);
    let (old_tables, old_lists) = old.unwrap_or((0, 0));
    (at_least(tables, old_tables), at_least(lists, old_lists))
}

#[cfg(test)]
mod tests;
