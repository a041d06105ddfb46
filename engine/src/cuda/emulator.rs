//! The kernels of `kernels.cu` on the CPU, for tests on machines without a
//! GPU: `emulator/emu.h` supplies CUDA's built-ins (blocks run one after
//! another, a block's `blockDim` threads as fibers that hand over at each
//! `__syncthreads`), the
//! system C++ compiler builds the kernel source into a library once per test
//! run, and [`Emulator`] implements [`Backend`] with host vectors as device
//! buffers and the launch geometry of [`Grid`], as the CUDA backend does.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use libloading::Library;

use super::{int, AttentionShape, Backend, Grid, KSplit};
use crate::error::Result;

/// The emulator's globals (grid, barrier) hold one launch at a time.
static LAUNCH: Mutex<()> = Mutex::new(());

fn library() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda/emulator/harness.cpp");
        let out: PathBuf = std::env::temp_dir().join(format!("heterospec-kernels-emu-{}.so", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-o"])
            .arg(&out)
            .arg(source)
            .status()
            .unwrap_or_else(|e| panic!("the kernel emulator needs a C++20 compiler (`{cxx}`, set CXX): {e}"));
        assert!(status.success(), "compiling the kernel emulator failed");
        // SAFETY: our own library, with no initialisers beyond globals.
        let lib = unsafe { Library::new(&out) }.expect("loading the kernel emulator");
        let _ = std::fs::remove_file(&out);
        lib
    })
}

/// Runs the kernels of `kernels.cu` on the CPU.
pub struct Emulator;

/// The multiprocessors the emulated device has: few, so that the tests'
/// small GEMMs split along k as a big GPU's large ones do.
pub const EMULATED_SMS: usize = 4;

type Dims = [u32; 3];

fn dims(g: Grid) -> (Dims, Dims) {
    ([g.grid.0, g.grid.1, g.grid.2], [g.block.0, g.block.1, g.block.2])
}

/// Calls `emu_<kernel>` with the grid and block of `$grid`, then the
/// arguments (their C types given by the signature).
macro_rules! emulate {
    ($name:literal, $grid:expr, fn($($ty:ty),* $(,)?), $($arg:expr),* $(,)?) => {{
        let _one = LAUNCH.lock().unwrap_or_else(|p| p.into_inner());
        let (grid, block) = dims($grid);
        // What CUDA refuses to launch.
        assert!(
            grid.iter().all(|&d| d > 0) && grid[1..].iter().all(|&d| d as usize <= super::MAX_GRID_Y),
            "{}: invalid grid {grid:?}",
            $name
        );
        assert!(block.iter().product::<u32>() <= 1024, "{}: block {block:?}", $name);
        // SAFETY: the signature is the harness entry's; buffers are sized by
        // the caller as `Backend` documents.
        unsafe {
            let f = library()
                .get::<unsafe extern "C" fn(*const u32, *const u32, $($ty),*)>(concat!("emu_", $name, "\0").as_bytes())
                .expect("emulated kernel");
            f(grid.as_ptr(), block.as_ptr(), $($arg),*);
        }
        Ok(())
    }};
}

impl Backend for Emulator {
    fn device(&self) -> crate::Device {
        crate::Device::Cuda(0)
    }

    type Floats = Vec<f32>;
    type Ints = Vec<i32>;
    type Halves = Vec<u16>;

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(if host.is_empty() { vec![0.0] } else { host.to_vec() })
    }

    fn upload_ints(&self, host: &[i32]) -> Result<Vec<i32>> {
        Ok(if host.is_empty() { vec![0] } else { host.to_vec() })
    }

    fn upload_bf16(&self, host: &[f32]) -> Result<Vec<u16>> {
        Ok(if host.is_empty() {
            vec![0]
        } else {
            super::bf16_bits(host)
        })
    }

    fn synthetic_bf16(&self, len: usize, seed: u64, scale: f32) -> Result<Vec<u16>> {
        let mut out = vec![0u16; len.max(1)];
        let launched: Result<()> = emulate!(
            "fill_synthetic_bf16",
            Grid::synthetic(len),
            fn(*mut u16, u64, u64, f32),
            out.as_mut_ptr(),
            len as u64,
            seed,
            scale
        );
        launched.map(|()| out)
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len.max(1)])
    }

    fn download(&self, buf: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        Ok(buf[..len].to_vec())
    }

    fn download_ints(&self, buf: &Vec<i32>, len: usize) -> Result<Vec<i32>> {
        Ok(buf[..len].to_vec())
    }

    fn greedy_rows(
        &self,
        logits: &Vec<f32>,
        ids: &mut Vec<i32>,
        logprobs: &mut Vec<f32>,
        (rows, vocab): (usize, usize),
    ) -> Result<()> {
        assert!(logits.len() >= rows * vocab && ids.len() >= rows && logprobs.len() >= rows);
        emulate!(
            "greedy_rows",
            Grid::rows(rows),
            fn(*const f32, i32, *mut i32, *mut f32),
            logits.as_ptr(),
            int(vocab),
            ids.as_mut_ptr(),
            logprobs.as_mut_ptr()
        )
    }

    fn top_rows(
        &self,
        logits: &Vec<f32>,
        ids: &mut Vec<i32>,
        logprobs: &mut Vec<f32>,
        (rows, vocab, m): (usize, usize, usize),
    ) -> Result<()> {
        assert!(logits.len() >= rows * vocab && ids.len() >= rows * m && logprobs.len() >= rows * m);
        emulate!(
            "top_rows",
            Grid::rows(rows),
            fn(*const f32, i32, i32, *mut i32, *mut f32),
            logits.as_ptr(),
            int(vocab),
            int(m),
            ids.as_mut_ptr(),
            logprobs.as_mut_ptr()
        )
    }

    fn k_split(&self, n: usize, k: usize) -> KSplit {
        KSplit::for_shape(n, k, EMULATED_SMS)
    }

    fn matmul(
        &self,
        a: &Vec<f32>,
        w: &Vec<u16>,
        c: &mut Vec<f32>,
        (m, n, k): (usize, usize, usize),
        acc: bool,
    ) -> Result<()> {
        assert!(a.len() >= m * k && w.len() >= n * k && c.len() >= m * n);
        let split = self.k_split(n, k);
        let splits = split.grid_splits(m, n);
        let mut part = vec![0.0f32; if splits > 1 { splits * m * n } else { 1 }];
        let launched: Result<()> = emulate!(
            "matmul_bf16",
            Grid::matmul(m, n, split),
            fn(*const f32, *const u16, *mut f32, *mut f32, i32, i32, i32, i32, i32),
            a.as_ptr(),
            w.as_ptr(),
            c.as_mut_ptr(),
            part.as_mut_ptr(),
            int(m),
            int(n),
            int(k),
            int(split.chunk),
            i32::from(acc)
        );
        launched?;
        if splits == 1 {
            return Ok(());
        }
        emulate!(
            "reduce_splits",
            Grid::elements(m * n),
            fn(*const f32, *mut f32, i32, i32, i32),
            part.as_ptr(),
            c.as_mut_ptr(),
            int(m * n),
            int(splits),
            i32::from(acc)
        )
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        out: &mut Vec<f32>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        assert!(x.len() >= rows * dim && out.len() >= rows * dim && weight.len() >= dim);
        emulate!(
            "rms_norm",
            Grid::rows(rows),
            fn(*const f32, *const f32, *mut f32, i32, f32),
            x.as_ptr(),
            weight.as_ptr(),
            out.as_mut_ptr(),
            int(dim),
            eps
        )
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        (tokens, heads, half): (usize, usize, usize),
    ) -> Result<()> {
        assert!(x.len() >= tokens * heads * 2 * half && cos.len() >= tokens * half && sin.len() >= tokens * half);
        emulate!(
            "rope",
            Grid::elements(tokens * heads * half),
            fn(*mut f32, *const f32, *const f32, i32, i32, i32),
            x.as_mut_ptr(),
            cos.as_ptr(),
            sin.as_ptr(),
            int(tokens),
            int(heads),
            int(half)
        )
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) -> Result<()> {
        assert!(gate.len() >= len && up.len() >= len);
        emulate!(
            "silu_mul",
            Grid::elements(len),
            fn(*mut f32, *const f32, i32),
            gate.as_mut_ptr(),
            up.as_ptr(),
            int(len)
        )
    }

    fn gather_rows(
        &self,
        x: &Vec<f32>,
        rows: &Vec<i32>,
        out: &mut Vec<f32>,
        (count, dim): (usize, usize),
    ) -> Result<()> {
        assert!(rows.len() >= count && out.len() >= count * dim);
        assert!(rows[..count].iter().all(|&r| (r as usize + 1) * dim <= x.len()));
        emulate!(
            "gather_rows",
            Grid::elements(count * dim),
            fn(*const f32, *const i32, *mut f32, i32, i32),
            x.as_ptr(),
            rows.as_ptr(),
            out.as_mut_ptr(),
            int(count),
            int(dim)
        )
    }

    fn embed_rows(
        &self,
        table: &Vec<u16>,
        ids: &Vec<i32>,
        out: &mut Vec<f32>,
        (count, dim): (usize, usize),
    ) -> Result<()> {
        assert!(ids.len() >= count && out.len() >= count * dim);
        assert!(ids[..count].iter().all(|&r| (r as usize + 1) * dim <= table.len()));
        emulate!(
            "embed_rows",
            Grid::elements(count * dim),
            fn(*const u16, *const i32, *mut f32, i32, i32),
            table.as_ptr(),
            ids.as_ptr(),
            out.as_mut_ptr(),
            int(count),
            int(dim)
        )
    }

    fn scatter_rows(
        &self,
        cache: &mut Vec<f32>,
        rows: &Vec<f32>,
        slots: &Vec<i32>,
        (count, dim): (usize, usize),
    ) -> Result<()> {
        assert!(slots.len() >= count && rows.len() >= count * dim);
        assert!(slots[..count].iter().all(|&s| (s as usize + 1) * dim <= cache.len()));
        emulate!(
            "scatter_rows",
            Grid::elements(count * dim),
            fn(*mut f32, *const f32, *const i32, i32, i32),
            cache.as_mut_ptr(),
            rows.as_ptr(),
            slots.as_ptr(),
            int(count),
            int(dim)
        )
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        (k, v): (&Vec<f32>, &Vec<f32>),
        out: &mut Vec<f32>,
        [keys, tables, lists, run_slots]: &[Vec<i32>; 4],
        s: AttentionShape,
    ) -> Result<()> {
        let row = s.tokens * s.num_heads * s.head_dim;
        assert!(q.len() >= row && out.len() >= row && keys.len() >= s.tokens * super::KEY_FIELDS);
        emulate!(
            "paged_attention",
            Grid::attention(s.num_heads, s.tokens),
            fn(
                *const f32,
                *const f32,
                *const f32,
                *mut f32,
                *const i32,
                *const i32,
                *const i32,
                *const i32,
                i32,
                i32,
                i32,
                i32,
                f32,
            ),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            out.as_mut_ptr(),
            keys.as_ptr(),
            tables.as_ptr(),
            lists.as_ptr(),
            run_slots.as_ptr(),
            int(s.num_heads),
            int(s.num_kv_heads),
            int(s.head_dim),
            int(s.block_size),
            s.scale()
        )
    }
}
