//! A verify forward's final-norm states left on the device
//! ([`crate::features::Features::Device`]), where a draft head on the same
//! device copies the rows it stores (`DeviceHead`'s observe) without the
//! host in between.
//!
//! Invariant: `values` holds `len` floats, the `(tokens, width)` rows of
//! the `Features::Device` that holds it, written by the forward and never
//! again; a reader on another backend only sees [`DeviceRows::to_host`].

use std::any::Any;
use std::sync::Arc;

use super::Backend;
use crate::error::Result;
use crate::features::DeviceRows;

/// The rows of one forward, on `B`'s device.
pub(super) struct DeviceFeatures<B: Backend> {
    pub backend: Arc<B>,
    pub values: B::Floats,
    pub len: usize,
}

impl<B: Backend> DeviceRows for DeviceFeatures<B> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn to_host(&self) -> Result<Vec<f32>> {
        #[cfg(test)]
        TO_HOST.with(|n| n.set(n.get() + 1));
        self.backend.download(&self.values, self.len)
    }
}

#[cfg(test)]
thread_local! {
    /// Copies to the host made on this thread (the tests see a head on the
    /// device take its rows there).
    pub(super) static TO_HOST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The device buffer of `rows` and its length in floats, where a forward
/// on `backend` (this very device) left them.
pub(super) fn on_backend<'a, B: Backend>(rows: &'a dyn DeviceRows, backend: &Arc<B>) -> Option<(&'a B::Floats, usize)> {
    rows.as_any()
        .downcast_ref::<DeviceFeatures<B>>()
        .filter(|f| Arc::ptr_eq(&f.backend, backend))
        .map(|f| (&f.values, f.len))
}
