//! A verify forward's tapped target states (what a draft head reads), where
//! the forward left them: on the host, or in the device memory of the
//! device that ran it, so a draft head on that device takes the rows it
//! wants without a round trip through the host.
//!
//! Invariant: both forms hold the same values, `(tokens, width)` in batch
//! token order; [`Features::rows`] reads either (a device's copy comes back
//! to the host only there).

use std::any::Any;

use crate::error::{EngineError, Result};

/// Feature rows left in a device's memory by the forward that made them.
pub trait DeviceRows: Send + Sync {
    /// The device buffer, for a reader on the same device to downcast.
    fn as_any(&self) -> &dyn Any;
    /// All rows, `(tokens, width)`, copied to the host.
    fn to_host(&self) -> Result<Vec<f32>>;
}

/// A forward's features of a tap, `(tokens, width)`.
pub enum Features {
    /// Rows on the host (empty without a tap).
    Host { values: Vec<f32>, width: usize },
    /// Rows in the device memory of the forward's device.
    Device {
        rows: Box<dyn DeviceRows>,
        tokens: usize,
        width: usize,
    },
}

impl Features {
    /// No features (a forward without a tap).
    pub fn none() -> Self {
        Features::Host {
            values: Vec::new(),
            width: 0,
        }
    }

    /// Rows on the host, `values` being `(tokens, width)`.
    pub fn host(values: Vec<f32>, width: usize) -> Self {
        Features::Host { values, width }
    }

    /// Floats per row.
    pub fn width(&self) -> usize {
        match self {
            Features::Host { width, .. } | Features::Device { width, .. } => *width,
        }
    }

    /// Rows held.
    pub fn tokens(&self) -> usize {
        match self {
            Features::Host { values, width } => values.len().checked_div(*width).unwrap_or(0),
            Features::Device { tokens, .. } => *tokens,
        }
    }

    /// The rows `picks`, `(picks, width)` on the host, copied back from the
    /// device first where they were left there.
    pub fn rows(&self, picks: &[usize]) -> Result<Vec<f32>> {
        let width = self.width();
        self.check_rows(picks)?;
        let copied;
        let values = match self {
            Features::Host { values, .. } => values,
            Features::Device { rows, .. } => {
                copied = rows.to_host()?;
                &copied
            }
        };
        Ok(picks
            .iter()
            .flat_map(|&p| &values[p * width..(p + 1) * width])
            .copied()
            .collect())
    }

    /// Every row of `picks` is one of the forward's.
    pub fn check_rows(&self, picks: &[usize]) -> Result<()> {
        match picks.iter().find(|&&p| p >= self.tokens()) {
            Some(&bad) => Err(EngineError::Config(format!(
                "feature row {bad} of a forward of {} tokens",
                self.tokens()
            ))),
            None => Ok(()),
        }
    }

    /// All rows on the host, `(tokens, width)`.
    pub fn into_host(self) -> Result<Vec<f32>> {
        match self {
            Features::Host { values, .. } => Ok(values),
            Features::Device { rows, .. } => rows.to_host(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Held(Vec<f32>);

    impl DeviceRows for Held {
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn to_host(&self) -> Result<Vec<f32>> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn rows_read_alike_wherever_they_were_left() {
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let host = Features::host(values.clone(), 4);
        let device = Features::Device {
            rows: Box::new(Held(values)),
            tokens: 3,
            width: 4,
        };
        for f in [&host, &device] {
            assert_eq!(f.tokens(), 3);
            assert_eq!(f.rows(&[2, 0]).unwrap(), [8.0, 9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 3.0]);
            assert!(f.rows(&[3]).is_err());
        }
        assert_eq!(Features::none().tokens(), 0);
    }
}
