//! CUDA graphs of the target's forward: a forward of up to
//! [`MAX_GRAPH_TOKENS`] tokens is padded to its bucket, its inputs are
//! written into buffers that persist, and the bucket's launches, captured
//! the first time it is seen, are replayed in one call instead of being
//! queued one by one (about a dozen launches per layer).
//!
//! Buckets are powers of two up to one GEMM row tile (64), then whole
//! tiles, so padding never adds a GEMM tile; a padding row (`HostInputs::
//! pad_to`) changes no real row, so a replay gives the eager forward's
//! bits. One set of buffers, sized for the largest bucket seen, serves
//! every graph: replays are queued one at a time on one stream.
//!
//! Invariant: every graph reads and writes only `shared`'s buffers, the
//! model's weights and the KV storage whose id is `kv` (its buffers and
//! block size baked in); when the buffers are replaced or another KV
//! storage comes, every graph is dropped before anything replays.

use std::collections::HashMap;

use super::forward::{launch, Buffers, Shape};
use super::layer::{HostInputs, StepInputs};
use super::{int, Backend, DeviceKv, GpuModel, TILE};
use crate::error::Result;

/// The most tokens a forward run from a graph has (larger ones are
/// queued launch by launch: their kernels dwarf the launches).
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

/// The captured forwards of one model, by shape.
pub(super) struct Graphs<B: Backend> {
    /// Whether forwards run from graphs (off: every launch is queued).
    enabled: bool,
    /// The KV storage the graphs write (`DeviceKv::id`; 0: none).
    kv: u64,
    shared: Option<Buffers<B>>,
    graphs: HashMap<Shape, B::Graph>,
    /// Captures made so far.
    pub captures: usize,
}

impl<B: Backend> Graphs<B> {
    /// Turns graphs on or off; off drops them and their buffers.
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.graphs.clear();
            self.shared = None;
        }
    }

    pub fn new(enabled: bool) -> Self {
        Graphs {
            enabled,
            kv: 0,
            shared: None,
            graphs: HashMap::new(),
            captures: 0,
        }
    }

    /// Whether a forward of `n` tokens runs from a graph (one that copies
    /// layer taps to the host between layers never does).
    pub fn takes(&self, n: usize, layer_taps: bool) -> bool {
        self.enabled && (1..=MAX_GRAPH_TOKENS).contains(&n) && !layer_taps
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
        if self.kv != kv.id {
            self.graphs.clear();
            self.kv = kv.id;
        }
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
        if !self.graphs.contains_key(&padded) {
            if self.graphs.len() >= MAX_GRAPHS {
                self.graphs.clear();
            }
            match b.capture(&mut || launch(model, kv, buf, padded, None)) {
                Ok(graph) => {
                    self.graphs.insert(padded, graph);
                    self.captures += 1;
                }
                Err(e) => {
                    tracing::warn!(
                        "capturing a forward into a CUDA graph failed ({e}); forwards run eagerly from now on"
                    );
                    self.enabled = false;
                    self.graphs.clear();
                    self.shared = None;
                    return Ok(None);
                }
            }
        }
        b.replay(&self.graphs[&padded])?;
        Ok(self.shared.as_ref())
    }

    /// Replaces the shared buffers with ones that hold `padded` and
    /// `host`'s key lists (twice them, for the contexts still to grow),
    /// and at least what the old ones held; drops every graph.
    fn grow(&mut self, model: &GpuModel<B>, block_size: usize, padded: Shape, host: &HostInputs) -> Result<()> {
        let (b, c) = (&*model.backend, &model.config);
        let old = self.shared.take();
        self.graphs.clear();
        let (tables, lists) = host.key_lens();
        let at_least = |now: usize, old: Option<usize>| (2 * now).max(FIRST_KEY_LENS).max(old.unwrap_or(0));
        let lens = (
            at_least(tables, old.as_ref().map(|o| o.step.lens().0)),
            at_least(lists, old.as_ref().map(|o| o.step.lens().1)),
        );
        // One GEMM row tile at least: growing within it would only recapture.
        let tokens = padded.tokens.max(TILE).max(old.as_ref().map_or(0, |o| o.tokens));
        let rows = padded.rows.max(TILE).max(old.as_ref().map_or(0, |o| o.rows));
        drop(old);
        let step = StepInputs::reserve(b, c, block_size, tokens, lens)?;
        self.shared = Some(Buffers::up_to(b, c, step, tokens, rows)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
