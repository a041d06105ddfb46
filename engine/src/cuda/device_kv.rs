//! Paged K/V in device memory: one buffer per layer for K and for V, with
//! the CPU's layout (slot-major), so block tables and slots mean the same
//! on both; slot copies go through the gather/scatter kernels.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{int, Backend, Gpu};
use crate::error::Result;
use crate::kv::{DeviceStorage, KvLayout};

/// Paged K/V of every layer in device memory, laid out as the CPU's.
pub struct DeviceKv<B: Backend = Gpu> {
    pub(super) backend: Arc<B>,
    /// Unique among this process's KV storages (what a captured graph
    /// that writes these buffers is tied to).
    pub(super) id: u64,
    pub(super) keys: Vec<B::Floats>,
    pub(super) values: Vec<B::Floats>,
    kv_size: usize,
    pub(super) block_size: usize,
}

impl<B: Backend> DeviceKv<B> {
    pub fn new(backend: Arc<B>, layout: KvLayout) -> Result<Self> {
        let per_layer = layout.num_slots() * layout.kv_size;
        let alloc = || {
            (0..layout.num_layers)
                .map(|_| backend.zeros(per_layer))
                .collect::<Result<Vec<_>>>()
        };
        let (keys, values) = (alloc()?, alloc()?);
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(DeviceKv {
            backend,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            keys,
            values,
            kv_size: layout.kv_size,
            block_size: layout.block_size,
        })
    }

    /// Copies the K/V at `src` slots to `dst` slots in every layer (all
    /// reads before any write).
    pub fn copy_slots(&mut self, src: &[usize], dst: &[usize]) -> Result<()> {
        let pairs: Vec<(usize, usize)> = src
            .iter()
            .copied()
            .zip(dst.iter().copied())
            .filter(|(s, d)| s != d)
            .collect();
        if pairs.is_empty() {
            return Ok(());
        }
        let b = &self.backend;
        let src = b.upload_ints(&pairs.iter().map(|&(s, _)| int(s)).collect::<Vec<_>>())?;
        let dst = b.upload_ints(&pairs.iter().map(|&(_, d)| int(d)).collect::<Vec<_>>())?;
        let mut rows = b.zeros(pairs.len() * self.kv_size)?;
        for cache in self.keys.iter_mut().chain(self.values.iter_mut()) {
            b.gather_rows(cache, &src, &mut rows, (pairs.len(), self.kv_size))?;
            b.scatter_rows(cache, &rows, &dst, (pairs.len(), self.kv_size))?;
        }
        Ok(())
    }

    /// One token's K and V of `layer` at `slot`.
    #[cfg(test)]
    pub(super) fn read(&self, layer: usize, slot: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = self.kv_size;
        let k = self.backend.download(&self.keys[layer], (slot + 1) * n)?;
        let v = self.backend.download(&self.values[layer], (slot + 1) * n)?;
        Ok((k[slot * n..].to_vec(), v[slot * n..].to_vec()))
    }
}

impl<B: Backend> DeviceStorage for DeviceKv<B> {
    fn copy_slots(&mut self, src: &[usize], dst: &[usize]) -> Result<()> {
        DeviceKv::copy_slots(self, src, dst)
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
