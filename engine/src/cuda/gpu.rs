//! The CUDA backend: cudarc's driver API (loaded at run time), one stream
//! per device, the kernels NVRTC compiled for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::nvrtc::{compile_kernels, MIN_ARCH};
use super::{int, AttentionShape, Backend, Grid, KSplit};
use crate::error::{EngineError, Result};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

fn driver(what: &'static str) -> impl FnOnce(DriverError) -> EngineError {
    move |e| EngineError::Device(format!("{what}: {e}"))
}

/// One opened device: its stream and the loaded kernels.
pub struct Gpu {
    ordinal: usize,
    name: String,
    /// Every copy and launch goes here, in order (a stream of its own:
    /// the legacy default stream cannot be captured into a graph).
    stream: Arc<CudaStream>,
    /// While [`Backend::capture`] records: the capturing thread's
    /// [`thread_token`] (else 0). Allocations and copies are refused then,
    /// and so are launches from any other thread (they would be recorded).
    capturing: AtomicU64,
    /// Streaming multiprocessors (what a GEMM's k split fills).
    sms: usize,
    _module: Arc<CudaModule>,
    matmul_bf16: CudaFunction,
    reduce_splits: CudaFunction,
    fill_synthetic_bf16: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    silu_mul: CudaFunction,
    gather_rows: CudaFunction,
    embed_rows: CudaFunction,
    greedy_rows: CudaFunction,
    top_rows: CudaFunction,
    scatter_rows: CudaFunction,
    paged_attention: CudaFunction,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{} ({})", self.ordinal, self.name)
    }
}

/// Lets the default memory pool keep what a forward frees for the next
/// one (its default hands it back to the driver at every synchronization,
/// and a forward synchronizes to copy its logits out).
fn keep_freed_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool = std::ptr::null_mut();
    let mut keep = u64::MAX;
    // SAFETY: the device's own pool, a u64 attribute as the API documents.
    let ok = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
            && sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            ) == sys::CUresult::CUDA_SUCCESS
    };
    if !ok {
        tracing::debug!("the GPU's memory pool keeps its default release threshold");
    }
}

impl From<Grid> for LaunchConfig {
    fn from(g: Grid) -> Self {
        LaunchConfig {
            grid_dim: g.grid,
            block_dim: g.block,
            shared_mem_bytes: 0,
        }
    }
}

impl Gpu {
    /// Opens CUDA device `ordinal` and compiles the kernels for it.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        // SAFETY: only tries to open the library (cudarc panics without it).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(EngineError::Device(
                "no CUDA driver (libcuda.so) on this machine: run with --device cpu, or on a GPU node with the \
                 NVIDIA driver (in Kubernetes, the NVIDIA device plugin mounts it)"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(driver("counting CUDA devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(EngineError::Device(format!(
                "cuda:{ordinal} was asked for but {count} CUDA devices are visible"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("opening the CUDA device"))?;
        // SAFETY: one stream does all the work, so cudarc's per-buffer
        // events (for ordering across streams) are not needed.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx);
        let name = ctx.name().map_err(driver("reading the device name"))?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("reading the multiprocessor count"))?;
        let arch = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        if arch < MIN_ARCH {
            return Err(EngineError::Device(format!(
                "cuda:{ordinal} ({name}) has compute capability {}.{}; the GPU path needs {}.{} or newer (bf16 \
                 tensor cores): run with --device cpu",
                arch.0, arch.1, MIN_ARCH.0, MIN_ARCH.1
            )));
        }
        // A CUBIN for this GPU; PTX for the driver to compile when this
        // NVRTC does not know the architecture yet.
        let kernels = compile_kernels(Some(arch)).or_else(|e| {
            tracing::warn!("{e}; falling back to PTX (compiled by the driver, which must be as new as NVRTC)");
            compile_kernels(None)
        })?;
        let module = ctx
            .load_module(kernels.into())
            .map_err(driver("loading the GPU kernels"))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| EngineError::Device(format!("kernel `{name}`: {e}")))
        };
        Ok(Arc::new(Gpu {
            ordinal,
            name,
            stream: ctx.new_stream().map_err(driver("creating a CUDA stream"))?,
            capturing: AtomicU64::new(0),
            sms: sms.max(1) as usize,
            matmul_bf16: f("matmul_bf16")?,
            reduce_splits: f("reduce_splits")?,
            fill_synthetic_bf16: f("fill_synthetic_bf16")?,
            rms_norm: f("rms_norm")?,
            rope: f("rope")?,
            silu_mul: f("silu_mul")?,
            gather_rows: f("gather_rows")?,
            embed_rows: f("embed_rows")?,
            greedy_rows: f("greedy_rows")?,
            top_rows: f("top_rows")?,
            scatter_rows: f("scatter_rows")?,
            paged_attention: f("paged_attention")?,
            _module: module,
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name, as the driver gives it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per second of device memory traffic in a 1 GiB
    /// device-to-device copy (each byte read once and written once),
    /// median of 5 after one warm-up: the bandwidth a forward that reads
    /// its weights once can approach.
    pub fn copy_bytes_per_second(&self) -> Result<f64> {
        const BYTES: usize = 1 << 30;
        self.not_capturing("measuring the copy bandwidth")?;
        let alloc = || {
            self.stream
                .alloc_zeros::<u8>(BYTES)
                .map_err(driver("allocating GPU memory"))
        };
        let (src, mut dst) = (alloc()?, alloc()?);
        let mut times = Vec::new();
        for _ in 0..6 {
            let start = std::time::Instant::now();
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver("copying on the GPU"))?;
            self.stream.synchronize().map_err(driver("copying on the GPU"))?;
            times.push(start.elapsed().as_secs_f64());
        }
        let mut timed = times.split_off(1);
        timed.sort_by(f64::total_cmp);
        Ok(2.0 * BYTES as f64 / timed[timed.len() / 2])
    }

    /// A device copy of `host`; an empty slice becomes one zero (CUDA
    /// allocations are never empty, and kernels read nothing from it).
    fn copy_in<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.not_capturing("copying to the GPU")?;
        let one = [T::default()];
        let host = if host.is_empty() { &one[..] } else { host };
        self.stream.clone_htod(host).map_err(driver("copying to the GPU"))
    }
}

impl Gpu {
    /// Refuses `what` while a graph records (see [`Backend::capture`]).
    fn not_capturing(&self, what: &str) -> Result<()> {
        match self.capturing.load(Ordering::Acquire) {
            0 => Ok(()),
            _ => Err(EngineError::Device(format!(
                "{what} while a CUDA graph is being captured"
            ))),
        }
    }

    /// Refuses a launch from another thread than the capturing one while
    /// a graph records.
    fn may_launch(&self, what: &str) -> Result<()> {
        match self.capturing.load(Ordering::Acquire) {
            0 => Ok(()),
            t if t == thread_token() => Ok(()),
            _ => Err(EngineError::Device(format!(
                "{what} launched while another thread captures a CUDA graph"
            ))),
        }
    }

    /// `host` into the start of `buf`.
    fn copy_into<T: DeviceRepr + ValidAsZeroBits>(&self, buf: &mut CudaSlice<T>, host: &[T]) -> Result<()> {
        self.not_capturing("copying to the GPU")?;
        if host.len() > buf.len() {
            return Err(EngineError::Device(format!(
                "{} values written into a GPU buffer of {}",
                host.len(),
                buf.len()
            )));
        }
        if host.is_empty() {
            return Ok(());
        }
        let mut head = buf.slice_mut(..host.len());
        self.stream
            .memcpy_htod(host, &mut head)
            .map_err(driver("copying to the GPU"))
    }

    /// The first `len` values of `buf`, after all work queued before.
    fn copy_out<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(
        &self,
        buf: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>> {
        // Kernels fail asynchronously: an error here may be an earlier launch's.
        let what = "copying from the GPU (or a kernel before it failed)";
        self.not_capturing(what)?;
        if len > buf.len() {
            return Err(EngineError::Device(format!(
                "{len} values read from a GPU buffer of {}",
                buf.len()
            )));
        }
        let out = match len {
            0 => Vec::new(),
            _ => self.stream.clone_dtoh(&buf.slice(..len)).map_err(driver(what))?,
        };
        self.stream.synchronize().map_err(driver(what))?;
        Ok(out)
    }
}

/// Launches `$f` on the stream with `$grid` and the arguments in order.
macro_rules! launch {
    ($self:ident, $f:ident, $grid:expr, $what:literal; $($arg:expr),* $(,)?) => {{
        $self.may_launch($what)?;
        let mut b = $self.stream.launch_builder(&$self.$f);
        $(b.arg($arg);)*
        // SAFETY: the arguments are the kernel's, in its order, with the
        // sizes `Backend` documents for it.
        unsafe { b.launch(LaunchConfig::from($grid)) }
            .map(drop)
            .map_err(driver($what))
    }};
}

impl Backend for Gpu {
    fn device(&self) -> crate::Device {
        crate::Device::Cuda(self.ordinal())
    }

    type Floats = CudaSlice<f32>;
    type Ints = CudaSlice<i32>;
    type Halves = CudaSlice<u16>;

    fn upload(&self, host: &[f32]) -> Result<Self::Floats> {
        self.copy_in(host)
    }

    fn upload_ints(&self, host: &[i32]) -> Result<Self::Ints> {
        self.copy_in(host)
    }

    fn upload_bf16(&self, host: &[f32]) -> Result<Self::Halves> {
        self.copy_in(&super::bf16_bits(host))
    }

    fn synthetic_bf16(&self, len: usize, seed: u64, scale: f32) -> Result<Self::Halves> {
        self.not_capturing("allocating GPU memory")?;
        let mut out = self
            .stream
            .alloc_zeros::<u16>(len.max(1))
            .map_err(driver("allocating GPU memory"))?;
        let n = len as u64;
        launch!(self, fill_synthetic_bf16, Grid::synthetic(len), "synthetic weights kernel"; &mut out, &n, &seed, &scale)?;
        Ok(out)
    }

    fn zeros(&self, len: usize) -> Result<Self::Floats> {
        self.not_capturing("allocating GPU memory")?;
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(driver("allocating GPU memory"))
    }

    fn download(&self, buf: &Self::Floats, len: usize) -> Result<Vec<f32>> {
        self.copy_out(buf, len)
    }

    fn download_ints(&self, buf: &Self::Ints, len: usize) -> Result<Vec<i32>> {
        self.copy_out(buf, len)
    }

    fn greedy_rows(
        &self,
        logits: &Self::Floats,
        ids: &mut Self::Ints,
        logprobs: &mut Self::Floats,
        (rows, vocab): (usize, usize),
    ) -> Result<()> {
        let v = int(vocab);
        launch!(self, greedy_rows, Grid::rows(rows), "greedy kernel"; logits, &v, ids, logprobs)
    }

    fn top_rows(
        &self,
        logits: &Self::Floats,
        ids: &mut Self::Ints,
        logprobs: &mut Self::Floats,
        (rows, vocab, m): (usize, usize, usize),
    ) -> Result<()> {
        let (v, m) = (int(vocab), int(m));
        launch!(self, top_rows, Grid::rows(rows), "top-k kernel"; logits, &v, &m, ids, logprobs)
    }

    fn k_split(&self, n: usize, k: usize) -> KSplit {
        KSplit::for_shape(n, k, self.sms)
    }

    fn matmul_in(
        &self,
        a: &Self::Floats,
        w: &Self::Halves,
        c: &mut Self::Floats,
        part: &mut Self::Floats,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let split = self.k_split(n, k);
        let (mi, ni, ki, acc) = (int(m), int(n), int(k), i32::from(accumulate));
        let (chunk, splits) = (int(split.chunk), int(split.splits));
        let grid = Grid::matmul(m, n, split);
        if split.grid_splits(m, n) == 1 {
            // No partial sums: `a` stands in for the unused `part`.
            return launch!(self, matmul_bf16, grid, "matmul kernel"; a, w, c, a, &mi, &ni, &ki, &chunk, &acc);
        }
        let need = self.split_len((m, n, k));
        if part.len() < need {
            return Err(EngineError::Device(format!(
                "a GEMM's partial sums need {need} floats, its buffer holds {}",
                part.len()
            )));
        }
        launch!(self, matmul_bf16, grid, "matmul kernel"; a, w, &mut *c, &mut *part, &mi, &ni, &ki, &chunk, &acc)?;
        let len = int(m * n);
        launch!(self, reduce_splits, Grid::elements(m * n), "k split reduction"; &*part, c, &len, &splits, &acc)
    }

    fn rms_norm(
        &self,
        x: &Self::Floats,
        weight: &Self::Floats,
        out: &mut Self::Floats,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<()> {
        let d = int(dim);
        launch!(self, rms_norm, Grid::rows(rows), "rms_norm kernel"; x, weight, out, &d, &eps)
    }

    fn rope(
        &self,
        x: &mut Self::Floats,
        cos: &Self::Floats,
        sin: &Self::Floats,
        (tokens, heads, half): (usize, usize, usize),
    ) -> Result<()> {
        let (t, h, hf) = (int(tokens), int(heads), int(half));
        launch!(self, rope, Grid::elements(tokens * heads * half), "rope kernel"; x, cos, sin, &t, &h, &hf)
    }

    fn silu_mul(&self, gate: &mut Self::Floats, up: &Self::Floats, len: usize) -> Result<()> {
        let n = int(len);
        launch!(self, silu_mul, Grid::elements(len), "silu kernel"; gate, up, &n)
    }

    fn gather_rows(
        &self,
        x: &Self::Floats,
        rows: &Self::Ints,
        out: &mut Self::Floats,
        (count, dim): (usize, usize),
    ) -> Result<()> {
        let (c, d) = (int(count), int(dim));
        launch!(self, gather_rows, Grid::elements(count * dim), "gather kernel"; x, rows, out, &c, &d)
    }

    fn embed_rows(
        &self,
        table: &Self::Halves,
        ids: &Self::Ints,
        out: &mut Self::Floats,
        (count, dim): (usize, usize),
    ) -> Result<()> {
        let (c, d) = (int(count), int(dim));
        launch!(self, embed_rows, Grid::elements(count * dim), "embedding kernel"; table, ids, out, &c, &d)
    }

    fn scatter_rows(
        &self,
        cache: &mut Self::Floats,
        rows: &Self::Floats,
        slots: &Self::Ints,
        (count, dim): (usize, usize),
    ) -> Result<()> {
        let (c, d) = (int(count), int(dim));
        launch!(self, scatter_rows, Grid::elements(count * dim), "scatter kernel"; cache, rows, slots, &c, &d)
    }

    fn write(&self, buf: &mut Self::Floats, host: &[f32]) -> Result<()> {
        self.copy_into(buf, host)
    }

    fn write_ints(&self, buf: &mut Self::Ints, host: &[i32]) -> Result<()> {
        self.copy_into(buf, host)
    }

    fn duplicate(&self, buf: &Self::Floats, len: usize) -> Result<Self::Floats> {
        if len == 0 {
            return self.zeros(0);
        }
        self.not_capturing("copying on the GPU")?;
        self.stream
            .clone_dtod(&buf.slice(..len))
            .map_err(driver("copying on the GPU"))
    }

    type Graph = GpuGraph;

    fn capture(&self, launches: &mut dyn FnMut() -> Result<()>) -> Result<GpuGraph> {
        /// Ends the capture however `launches` ends (a panic included), so
        /// the stream runs work again.
        struct Capturing<'a>(&'a Gpu);
        impl Capturing<'_> {
            fn end(&self) -> std::result::Result<Option<CudaGraph>, DriverError> {
                let graph = self.0.stream.end_capture(sys::CUgraphInstantiate_flags(0));
                self.0.capturing.store(0, Ordering::Release);
                graph
            }
        }
        impl Drop for Capturing<'_> {
            fn drop(&mut self) {
                if self.0.capturing.load(Ordering::Acquire) != 0 {
                    let _ = self.end();
                }
            }
        }
        let token = thread_token();
        if self
            .capturing
            .compare_exchange(0, token, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(EngineError::Device("a CUDA graph is already being captured".into()));
        }
        if let Err(e) = self
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            self.capturing.store(0, Ordering::Release);
            return Err(driver("starting a CUDA graph capture")(e));
        }
        let capturing = Capturing(self);
        let launched = launches();
        let graph = capturing.end();
        launched?;
        match graph.map_err(driver("instantiating a CUDA graph"))? {
            Some(graph) => Ok(GpuGraph(graph)),
            None => Err(EngineError::Device("a CUDA graph capture recorded nothing".into())),
        }
    }

    fn replay(&self, graph: &GpuGraph) -> Result<()> {
        self.not_capturing("replaying a CUDA graph")?;
        graph.0.launch().map_err(driver("launching a CUDA graph"))
    }

    fn attention(
        &self,
        q: &Self::Floats,
        (kcache, vcache): (&Self::Floats, &Self::Floats),
        out: &mut Self::Floats,
        [keys, tables, lists, run_slots]: &[Self::Ints; 4],
        s: AttentionShape,
    ) -> Result<()> {
        let (heads, kv_heads, hd, bs) = (
            int(s.num_heads),
            int(s.num_kv_heads),
            int(s.head_dim),
            int(s.block_size),
        );
        let scale = s.scale();
        launch!(self, paged_attention, Grid::attention(s.num_heads, s.tokens), "attention kernel";
            q, kcache, vcache, out, keys, tables, lists, run_slots, &heads, &kv_heads, &hd, &bs, &scale)
    }
}

/// An instantiated CUDA graph of launches on [`Gpu`]'s stream.
pub struct GpuGraph(CudaGraph);

// SAFETY: a graph is used by one thread at a time: its owner (the model's
// graph cache) holds it behind a mutex, and replays it on the stream it
// was captured on.
unsafe impl Send for GpuGraph {}

/// This thread's token: never 0, distinct between threads.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TOKEN.with(|t| *t)
}
