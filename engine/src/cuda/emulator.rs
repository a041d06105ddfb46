//! The kernels of `kernels.cu` on the CPU, for tests on machines without a
//! GPU: `emulator/emu.h` supplies CUDA's built-ins (blocks run one after
//! another, a block's `blockDim` threads as fibers that hand over at each
//! `__syncthreads`), the
//! system C++ compiler builds the kernel source into a library once per test
//! run, and [`Emulator`] implements [`Backend`] with host vectors as device
//! buffers and the launch geometry of [`Grid`], as the CUDA backend does.
//! A capture records each launch (its entry point and arguments, buffers
//! by address) on the capturing thread, as CUDA's thread-local capture
//! mode does; a replay calls them again in order.

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use libloading::Library;

use super::{int, AttentionShape, Backend, Grid, KSplit};
use crate::error::{EngineError, Result};

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

/// One launch: an entry point called with its arguments.
pub struct Launch(Box<dyn Fn()>);

// SAFETY: a launch holds addresses of buffers that outlive it (what
// `Backend::capture` asks of a capture's launches) and runs under `LAUNCH`.
unsafe impl Send for Launch {}

/// Launches recorded by a capture, replayed in order.
pub struct EmulatedGraph(Vec<Launch>);

thread_local! {
    /// The launches of the capture running on this thread, if one is.
    static RECORDING: RefCell<Option<Vec<Launch>>> = const { RefCell::new(None) };
}

fn recording() -> bool {
    RECORDING.with(|r| r.borrow().is_some())
}

/// Refuses `what` while this thread records (as CUDA refuses it).
fn not_capturing(what: &str) -> Result<()> {
    match recording() {
        true => Err(EngineError::Device(format!("{what} while a graph is being captured"))),
        false => Ok(()),
    }
}

/// Runs `launch` now, or records it when this thread is capturing.
fn run_or_record(launch: Launch) {
    let launch = RECORDING.with(|r| match r.borrow_mut().as_mut() {
        Some(recorded) => {
            recorded.push(launch);
            None
        }
        None => Some(launch),
    });
    if let Some(Launch(f)) = launch {
        f();
    }
}

/// Checks, when the launch after it runs (now, or at each replay of a
/// recorded graph), that the `count` row indices at `at` address rows of
/// `dim` inside `len` values (or are negative, where `negative_skipped`).
fn check_indices(what: &'static str, (at, count): (*const i32, usize), dim: usize, len: usize, negative_skipped: bool) {
    run_or_record(Launch(Box::new(move || {
        // SAFETY: `at` holds `count` ints (the caller checked), alive as
        // long as the launch it guards.
        let indices = unsafe { std::slice::from_raw_parts(at, count) };
        let fits = |i: i32| (i < 0 && negative_skipped) || (i >= 0 && (i as usize + 1) * dim <= len);
        let bad = indices.iter().find(|&&i| !fits(i));
        assert!(
            bad.is_none(),
            "{what}: row {bad:?} is outside the buffer's {len} values"
        );
    })));
}

/// Calls `emu_<kernel>` with the grid and block of `$grid`, then the
/// arguments (each named, with its C type), now or when a recorded
/// graph is replayed.
macro_rules! emulate {
    ($name:literal, $grid:expr, $($p:ident: $ty:ty = $arg:expr),* $(,)?) => {{
        let (grid, block) = dims($grid);
        // What CUDA refuses to launch.
        assert!(
            grid.iter().all(|&d| d > 0) && grid[1..].iter().all(|&d| d as usize <= super::MAX_GRID_Y),
            "{}: invalid grid {grid:?}",
            $name
        );
        assert!(block.iter().product::<u32>() <= 1024, "{}: block {block:?}", $name);
        $(let $p: $ty = $arg;)*
        run_or_record(Launch(Box::new(move || {
            let _one = LAUNCH.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: the signature is the harness entry's; buffers are sized
            // by the caller as `Backend` documents, and outlive a recording.
            unsafe {
                let f = library()
                    .get::<unsafe extern "C" fn(*const u32, *const u32, $($ty),*)>(concat!("emu_", $name, "\0").as_bytes())
                    .expect("emulated kernel");
                f(grid.as_ptr(), block.as_ptr(), $($p),*);
            }
        })));
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
        not_capturing("copying to the device")?;
        Ok(if host.is_empty() { vec![0.0] } else { host.to_vec() })
    }

    fn upload_ints(&self, host: &[i32]) -> Result<Vec<i32>> {
        not_capturing("copying to the device")?;
        Ok(if host.is_empty() { vec![0] } else { host.to_vec() })
    }

    fn upload_bf16(&self, host: &[f32]) -> Result<Vec<u16>> {
        not_capturing("copying to the device")?;
        Ok(if host.is_empty() {
            vec![0]
        } else {
            super::bf16_bits(host)
        })
    }

    fn synthetic_bf16(&self, len: usize, seed: u64, scale: f32) -> Result<Vec<u16>> {
        not_capturing("allocating device memory")?;
        let mut out = vec![0u16; len.max(1)];
        let launched: Result<()> = emulate!(
            "fill_synthetic_bf16",
            Grid::synthetic(len),
            out_p: *mut u16 = out.as_mut_ptr(),
            n: u64 = len as u64,
            seed: u64 = seed,
            scale: f32 = scale,
        );
        launched.map(|()| out)
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        not_capturing("allocating device memory")?;
        Ok(vec![0.0; len.max(1)])
    }

    fn download(&self, buf: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        not_capturing("copying from the device")?;
        Ok(buf[..len].to_vec())
    }

    fn download_ints(&self, buf: &Vec<i32>, len: usize) -> Result<Vec<i32>> {
        not_capturing("copying from the device")?;
        Ok(buf[..len].to_vec())
    }

    fn write(&self, buf: &mut Vec<f32>, host: &[f32]) -> Result<()> {
        not_capturing("copying to the device")?;
        buf[..host.len()].copy_from_slice(host);
        Ok(())
    }

    fn write_ints(&self, buf: &mut Vec<i32>, host: &[i32]) -> Result<()> {
        not_capturing("copying to the device")?;
        buf[..host.len()].copy_from_slice(host);
        Ok(())
    }

    fn duplicate(&self, buf: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        not_capturing("copying on the device")?;
        let mut out = buf[..len].to_vec();
        out.resize(len.max(1), 0.0);
        Ok(out)
    }

    type Graph = EmulatedGraph;

    fn capture(&self, launches: &mut dyn FnMut() -> Result<()>) -> Result<EmulatedGraph> {
        not_capturing("capturing a graph")?;
        RECORDING.with(|r| *r.borrow_mut() = Some(Vec::new()));
        let launched = launches();
        let recorded = RECORDING.with(|r| r.borrow_mut().take()).unwrap_or_default();
        launched.map(|()| EmulatedGraph(recorded))
    }

    fn replay(&self, graph: &EmulatedGraph) -> Result<()> {
        not_capturing("replaying a graph")?;
        for Launch(f) in &graph.0 {
            f();
        }
        Ok(())
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
            logits: *const f32 = logits.as_ptr(),
            vocab: i32 = int(vocab),
            ids: *mut i32 = ids.as_mut_ptr(),
            logprobs: *mut f32 = logprobs.as_mut_ptr(),
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
            logits: *const f32 = logits.as_ptr(),
            vocab: i32 = int(vocab),
            m: i32 = int(m),
            ids: *mut i32 = ids.as_mut_ptr(),
            logprobs: *mut f32 = logprobs.as_mut_ptr(),
        )
    }

    fn k_split(&self, n: usize, k: usize) -> KSplit {
        KSplit::for_shape(n, k, EMULATED_SMS)
    }

    fn matmul_in(
        &self,
        a: &Vec<f32>,
        w: &Vec<u16>,
        c: &mut Vec<f32>,
        part: &mut Vec<f32>,
        (m, n, k): (usize, usize, usize),
        acc: bool,
    ) -> Result<()> {
        assert!(a.len() >= m * k && w.len() >= n * k && c.len() >= m * n);
        assert!(
            part.len() >= self.split_len((m, n, k)),
            "partial sums of {m} x {n} x {k}"
        );
        let split = self.k_split(n, k);
        let splits = split.grid_splits(m, n);
        let launched: Result<()> = emulate!(
            "matmul_bf16",
            Grid::matmul(m, n, split),
            a: *const f32 = a.as_ptr(),
            w: *const u16 = w.as_ptr(),
            c_p: *mut f32 = c.as_mut_ptr(),
            part_p: *mut f32 = part.as_mut_ptr(),
            mi: i32 = int(m),
            ni: i32 = int(n),
            ki: i32 = int(k),
            chunk: i32 = int(split.chunk),
            acc_i: i32 = i32::from(acc),
        );
        launched?;
        if splits == 1 {
            return Ok(());
        }
        emulate!(
            "reduce_splits",
            Grid::elements(m * n),
            part: *const f32 = part.as_ptr(),
            c: *mut f32 = c.as_mut_ptr(),
            len: i32 = int(m * n),
            splits: i32 = int(splits),
            acc: i32 = i32::from(acc),
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
            x: *const f32 = x.as_ptr(),
            weight: *const f32 = weight.as_ptr(),
            out: *mut f32 = out.as_mut_ptr(),
            dim: i32 = int(dim),
            eps: f32 = eps,
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
            x: *mut f32 = x.as_mut_ptr(),
            cos: *const f32 = cos.as_ptr(),
            sin: *const f32 = sin.as_ptr(),
            t: i32 = int(tokens),
            h: i32 = int(heads),
            hf: i32 = int(half),
        )
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) -> Result<()> {
        assert!(gate.len() >= len && up.len() >= len);
        emulate!(
            "silu_mul",
            Grid::elements(len),
            gate: *mut f32 = gate.as_mut_ptr(),
            up: *const f32 = up.as_ptr(),
            n: i32 = int(len),
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
        check_indices("gather_rows", (rows.as_ptr(), count), dim, x.len(), false);
        emulate!(
            "gather_rows",
            Grid::elements(count * dim),
            x: *const f32 = x.as_ptr(),
            rows: *const i32 = rows.as_ptr(),
            out: *mut f32 = out.as_mut_ptr(),
            c: i32 = int(count),
            d: i32 = int(dim),
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
        check_indices("embed_rows", (ids.as_ptr(), count), dim, table.len(), false);
        emulate!(
            "embed_rows",
            Grid::elements(count * dim),
            table: *const u16 = table.as_ptr(),
            ids: *const i32 = ids.as_ptr(),
            out: *mut f32 = out.as_mut_ptr(),
            c: i32 = int(count),
            d: i32 = int(dim),
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
        // A negative slot writes nothing (a padding row).
        check_indices("scatter_rows", (slots.as_ptr(), count), dim, cache.len(), true);
        emulate!(
            "scatter_rows",
            Grid::elements(count * dim),
            cache: *mut f32 = cache.as_mut_ptr(),
            rows: *const f32 = rows.as_ptr(),
            slots: *const i32 = slots.as_ptr(),
            c: i32 = int(count),
            d: i32 = int(dim),
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
            q: *const f32 = q.as_ptr(),
            k: *const f32 = k.as_ptr(),
            v: *const f32 = v.as_ptr(),
            out: *mut f32 = out.as_mut_ptr(),
            keys: *const i32 = keys.as_ptr(),
            tables: *const i32 = tables.as_ptr(),
            lists: *const i32 = lists.as_ptr(),
            run_slots: *const i32 = run_slots.as_ptr(),
            heads: i32 = int(s.num_heads),
            kv_heads: i32 = int(s.num_kv_heads),
            hd: i32 = int(s.head_dim),
            bs: i32 = int(s.block_size),
            scale: f32 = s.scale(),
        )
    }
}
