//! Paged KV storage: the engine's preallocated K/V tensors.
//!
//! Allocated once at start-up from a memory budget; never grown. Block ids
//! come from `heterospec_kv` (the router's bookkeeping); this module only
//! stores values at slots.
//!
//! Layout per layer, for K and for V (f32):
//! ```text
//!   (num_blocks, block_size, num_kv_heads, head_dim)
//!   slot s = block * block_size + offset  ->  &data[s * kv_size .. (s + 1) * kv_size]
//! ```
//! Block 0 is reserved and acts as a harmless write target for padding.
//! A GPU backend keeps its storage in device memory behind [`DeviceStorage`],
//! same layout; [`crate::Model::new_kv`] asks the model's backend.

use std::any::Any;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// Default KV budget: ~23k tokens of the default model (46 KiB per token).
pub const DEFAULT_KV_CACHE_BYTES: usize = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_layers: usize,
    /// `num_kv_heads * head_dim`: floats per token per layer for K (and for V).
    pub kv_size: usize,
    /// Slots after the last block, owned by the engine (draft tree nodes
    /// before verification); never part of a block table.
    pub scratch_slots: usize,
}

impl KvLayout {
    /// The largest pool that fits `memory_bytes` for this model.
    pub fn for_budget(config: &ModelConfig, block_size: usize, memory_bytes: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(EngineError::Config("block size must be positive".into()));
        }
        let kv_size = config.kv_size();
        let bytes_per_block = 2 * config.num_layers * block_size * kv_size * std::mem::size_of::<f32>();
        let num_blocks = memory_bytes / bytes_per_block;
        if num_blocks < 2 {
            return Err(EngineError::Config(format!(
                "KV cache memory of {memory_bytes} bytes holds fewer than 2 blocks of {bytes_per_block} bytes"
            )));
        }
        Ok(KvLayout {
            num_blocks,
            block_size,
            num_layers: config.num_layers,
            kv_size,
            scratch_slots: 0,
        })
    }

    /// Block slots plus scratch slots.
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size + self.scratch_slots
    }

    /// The `i`-th scratch slot.
    pub fn scratch_slot(&self, i: usize) -> usize {
        debug_assert!(i < self.scratch_slots);
        self.num_blocks * self.block_size + i
    }
}

/// KV storage in a device's memory, owned by the backend that made it.
pub trait DeviceStorage: Send {
    /// Copies the K/V of `src` slots to `dst` slots in every layer.
    fn copy_slots(&mut self, src: &[usize], dst: &[usize]) -> Result<()>;
    /// The backend's own type (its forward downcasts to it).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// K and V values of every layer at every slot: in host memory, or in a
/// device's.
pub struct KvStorage {
    layout: KvLayout,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    device: Option<Box<dyn DeviceStorage>>,
}

impl KvStorage {
    /// Storage in host memory.
    pub fn new(layout: KvLayout) -> Self {
        let per_layer = layout.num_slots() * layout.kv_size;
        KvStorage {
            layout,
            keys: (0..layout.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            values: (0..layout.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            device: None,
        }
    }

    /// Storage in device memory (nothing on the host).
    pub fn on_device(layout: KvLayout, device: Box<dyn DeviceStorage>) -> Self {
        KvStorage {
            layout,
            keys: Vec::new(),
            values: Vec::new(),
            device: Some(device),
        }
    }

    /// The device storage, when this is one.
    pub fn device_mut(&mut self) -> Option<&mut (dyn DeviceStorage + 'static)> {
        self.device.as_deref_mut()
    }

    pub fn is_on_device(&self) -> bool {
        self.device.is_some()
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// One layer of host storage.
    pub fn layer(&self, layer: usize) -> LayerKv<'_> {
        assert!(!self.is_on_device(), "host access to KV storage in device memory");
        LayerKv {
            keys: &self.keys[layer],
            values: &self.values[layer],
            kv_size: self.layout.kv_size,
        }
    }

    /// Writes one token's K and V (each `kv_size` floats) of `layer` at `slot`.
    pub fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let n = self.layout.kv_size;
        debug_assert!(slot < self.layout.num_slots());
        self.keys[layer][slot * n..(slot + 1) * n].copy_from_slice(k);
        self.values[layer][slot * n..(slot + 1) * n].copy_from_slice(v);
    }

    /// Copies the K/V of `src` slots to `dst` slots in every layer (moves an
    /// accepted draft path into its final positions; no slot is both a
    /// source and a destination).
    pub fn copy_slots(&mut self, src: &[usize], dst: &[usize]) -> crate::Result<()> {
        if let Some(device) = &mut self.device {
            return device.copy_slots(src, dst);
        }
        let n = self.layout.kv_size;
        for layer in 0..self.layout.num_layers {
            for (&s, &d) in src.iter().zip(dst) {
                if s != d {
                    self.keys[layer].copy_within(s * n..(s + 1) * n, d * n);
                    self.values[layer].copy_within(s * n..(s + 1) * n, d * n);
                }
            }
        }
        Ok(())
    }
}

/// Read-only view of one layer's K/V.
#[derive(Clone, Copy)]
pub struct LayerKv<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    kv_size: usize,
}

impl<'a> LayerKv<'a> {
    /// K of one kv head at `slot`: `head_dim` floats.
    #[inline]
    pub fn key(&self, slot: usize, kv_head: usize, head_dim: usize) -> &'a [f32] {
        let start = slot * self.kv_size + kv_head * head_dim;
        &self.keys[start..start + head_dim]
    }

    #[inline]
    pub fn value(&self, slot: usize, kv_head: usize, head_dim: usize) -> &'a [f32] {
        let start = slot * self.kv_size + kv_head * head_dim;
        &self.values[start..start + head_dim]
    }
}
