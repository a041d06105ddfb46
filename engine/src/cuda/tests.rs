use super::*;
use crate::batch::SeqRun;
use crate::kv::KvStorage;
use crate::testing::random_tensors;
use crate::{Device, Model, WeightFormat};
use heterospec_kv::BlockId;

const KERNEL_NAMES: [&str; 11] = [
    "matmul_bf16",
    "reduce_splits",
    "fill_synthetic_bf16",
    "rms_norm",
    "rope",
    "silu_mul",
    "gather_rows",
    "embed_rows",
    "greedy_rows",
    "scatter_rows",
    "paged_attention",
];

/// NVRTC compiles every kernel to PTX, and to machine code for Ampere
/// and Hopper GPUs (its built-in ptxas checks registers and shared
/// memory); no GPU needed (`.ci/run` installs NVRTC from PyPI).
#[test]
fn the_kernels_compile_with_nvrtc() {
    let text = match compile_kernels(None) {
        Ok(KernelImage::Ptx(text)) => text,
        other => panic!("PTX expected without an architecture: {other:?}"),
    };
    for name in KERNEL_NAMES {
        assert!(
            text.contains(&format!(".entry {name}(")),
            "kernel {name} is not in the PTX"
        );
    }
    for arch in [(8, 0), (9, 0)] {
        let bytes = match compile_kernels(Some(arch)) {
            Ok(KernelImage::Cubin(bytes)) => bytes,
            Ok(KernelImage::Ptx(_)) => panic!("a CUBIN expected for sm_{}{}", arch.0, arch.1),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(&bytes[..4], b"\x7fELF", "sm_{}{} image", arch.0, arch.1);
        for name in KERNEL_NAMES {
            let found = bytes.windows(name.len()).any(|w| w == name.as_bytes());
            assert!(found, "kernel {name} is not in the sm_{}{} image", arch.0, arch.1);
        }
    }
    let err = compile_kernels(Some((1, 0))).unwrap_err().to_string();
    assert!(err.contains("sm_10"), "{err}");
}

/// Two sequences with cache: a causal chunk with extras on one token,
/// and a draft tree (mask) whose nodes also see earlier ancestors.
fn mixed_batch(block_size: usize) -> RaggedBatch {
    let table: Vec<BlockId> = (1..=16).map(BlockId).collect();
    let mut causal = SeqRun::causal(vec![1, 2, 3], 5, &table, block_size).unwrap();
    causal.extra_slots = vec![vec![], vec![90, 91], vec![]];
    causal.logits_rows = vec![0, 2];
    let table: Vec<BlockId> = (17..=32).map(BlockId).collect();
    let mut tree = SeqRun::causal(vec![4, 5, 6, 7], 9, &table, block_size).unwrap();
    tree.slots = vec![80, 81, 82, 83];
    tree.positions = vec![9, 10, 10, 11];
    #[rustfmt::skip]
    let mask = vec![
        true,  false, false, false,
        true,  true,  false, false,
        true,  false, true,  false,
        true,  true,  false, true,
    ];
    tree.mask = Some(mask);
    tree.extra_slots = vec![vec![70]; 4];
    tree.logits_rows = vec![0, 1, 2, 3];
    let single = SeqRun::causal(vec![8], 0, &[BlockId(33)], block_size).unwrap();
    RaggedBatch {
        seqs: vec![causal, tree, single],
    }
}

/// The key lists the kernel walks are the CPU attention's, in its
/// order: cached positions, extra slots, then the run tokens the token
/// sees.
#[test]
fn attention_keys_list_what_the_cpu_attends_in_its_order() {
    for block_size in [1, 4, 16] {
        let batch = mixed_batch(block_size);
        let keys = AttentionKeys::new(&batch);
        let mut t = 0;
        for seq in &batch.seqs {
            for i in 0..seq.len() {
                let mut want: Vec<usize> = (0..seq.num_cached).map(|p| seq.cached_slot(p, block_size)).collect();
                want.extend(seq.extra_slots.get(i).into_iter().flatten());
                want.extend((0..seq.len()).filter(|&j| seq.attends(i, j)).map(|j| seq.slots[j]));
                assert_eq!(keys.slots_of(t, block_size), want, "token {t}, block size {block_size}");
                t += 1;
            }
        }
        assert_eq!(keys.keys.len(), t * KEY_FIELDS);
    }
}

/// Shapes the GPU kernels meet on real models: head dimension 64,
/// several GEMM tiles, more than one attention chunk of keys; RoPE
/// frequency factors as Llama 3.1's (the table is built on the host).
fn gpu_config() -> ModelConfig {
    ModelConfig {
        num_layers: 3,
        hidden_size: 192,
        intermediate_size: 320,
        num_heads: 3,
        num_kv_heads: 1,
        head_dim: 64,
        vocab_size: 130,
        max_context: 1024,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        block: Default::default(),
        rope_freq_factors: Some((0..32).map(|i| 1.0 + i as f32 / 8.0).collect()),
        sliding_window: None,
        attn_scale_dim: 64,
    }
}

/// `t` with every matrix rounded to bf16, as the device holds it (norm
/// weights, vectors, stay f32 on both).
fn bf16_rounded(mut t: ModelTensors) -> ModelTensors {
    use candle_core::quantized::{GgmlDType, QTensor};
    for q in t.tensors.values_mut() {
        let x = q.dequantize(&candle_core::Device::Cpu).unwrap();
        if x.dims().len() < 2 {
            continue;
        }
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = bf16_bits(&v)
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect();
        let x = candle_core::Tensor::from_vec(v, x.dims(), &candle_core::Device::Cpu).unwrap();
        *q = QTensor::quantize(&x, GgmlDType::F32).unwrap();
    }
    t
}

/// A backend's forward driven as [`Model`] drives it, next to the CPU
/// model of the same weights (rounded to bf16
/// as the device's are, so the two differ only by the device rounding
/// its activations to bf16 at each product).
struct OnDevice<B: Backend> {
    cpu: Model,
    device: GpuModel<B>,
}

impl<B: Backend> OnDevice<B> {
    fn new(backend: Arc<B>) -> Self {
        let tensors = bf16_rounded(random_tensors(&gpu_config(), 3).unwrap());
        let device = GpuModel::new(backend, &tensors).unwrap();
        OnDevice {
            cpu: Model::from_tensors(tensors, WeightFormat::F32).unwrap(),
            device,
        }
    }

    fn kv(&self, layout: KvLayout) -> DeviceKv<B> {
        DeviceKv::new(self.device.backend().clone(), layout).unwrap()
    }

    fn forward(
        &self,
        batch: &RaggedBatch,
        kv: &mut DeviceKv<B>,
        layers: usize,
        tap: Option<&FeatureTap>,
    ) -> (Vec<f32>, Vec<f32>) {
        let rows: Vec<usize> = batch.logits_token_rows().collect();
        self.device.forward_on(batch, kv, layers, tap, &rows).unwrap()
    }
}

fn layout(block_size: usize) -> KvLayout {
    KvLayout {
        num_blocks: 128,
        block_size,
        num_layers: gpu_config().num_layers,
        kv_size: gpu_config().kv_size(),
        scratch_slots: 8,
    }
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-3, "{what}: max abs diff {worst}");
}

/// The device's outputs against the CPU model's: within what rounding
/// the activations to bf16 (8 significant bits) before each product
/// allows, relative to the largest output.
fn assert_near(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    let scale = b.iter().map(|x| x.abs()).fold(0.0, f32::max);
    assert!(
        worst <= BF16_TOLERANCE * scale.max(1.0),
        "{what}: max abs diff {worst}, largest value {scale}"
    );
}

/// See [`assert_near`].
const BF16_TOLERANCE: f32 = 5e-3;

/// A long prompt (past 256 keys: two attention chunks), then the mixed
/// batch (cache, extras, a tree) with both kinds of features, and a
/// self-draft's first layer: the device's logits and features are the
/// CPU model's up to f32 summation order; slot copies land; the output
/// layer alone agrees.
fn forward_matches_the_cpu<B: Backend>(backend: Arc<B>, block_sizes: &[usize], prompt_len: usize) {
    let dev = OnDevice::new(backend);
    let cpu = &dev.cpu;
    let layers = gpu_config().num_layers;
    for &block_size in block_sizes {
        let mut cpu_kv = KvStorage::new(layout(block_size));
        let mut dev_kv = dev.kv(layout(block_size));
        let prompt: Vec<u32> = (0..prompt_len).map(|i| (i * 7 % 130) as u32).collect();
        let table: Vec<BlockId> = (1..=prompt_len.div_ceil(block_size) as u32).map(BlockId).collect();
        // A prefill chunk that wants no logits, then the rest.
        let split = prompt_len - 40;
        let mut first = SeqRun::causal(prompt[..split].to_vec(), 0, &table, block_size).unwrap();
        first.logits_rows.clear();
        let batch = RaggedBatch { seqs: vec![first] };
        assert!(dev.forward(&batch, &mut dev_kv, layers, None).0.is_empty());
        assert!(cpu.forward(&batch, &mut cpu_kv).unwrap().is_empty());
        let rest = SeqRun::causal(prompt[split..].to_vec(), split, &table, block_size).unwrap();
        let batch = RaggedBatch {
            seqs: vec![rest.with_all_logits()],
        };
        let (b, _) = dev.forward(&batch, &mut dev_kv, layers, None);
        assert_near(&b, &cpu.forward(&batch, &mut cpu_kv).unwrap(), "long prompt");

        let batch = mixed_batch(block_size);
        for tap in [FeatureTap::Final, FeatureTap::Layers(vec![0, 2, 3])] {
            let (a, fa) = cpu.forward_with_features(&batch, &mut cpu_kv, &tap).unwrap();
            let (b, fb) = dev.forward(&batch, &mut dev_kv, layers, Some(&tap));
            assert_near(&b, &a, "mixed batch logits");
            assert_near(&fb, &fa, "features");
        }
        let (first, _) = dev.forward(&batch, &mut dev_kv, 1, None);
        assert_near(
            &first,
            &cpu.forward_layers(&batch, &mut cpu_kv, 1).unwrap(),
            "first layer only",
        );

        let before = dev_kv.read(2, 81).unwrap();
        let other = dev_kv.read(2, 82).unwrap();
        assert_ne!(before, other);
        dev_kv.copy_slots(&[81, 82], &[100, 101]).unwrap();
        assert_eq!(dev_kv.read(2, 100).unwrap(), before);
        assert_eq!(dev_kv.read(0, 101).unwrap().1.len(), gpu_config().kv_size());
        assert_eq!(dev_kv.read(2, 101).unwrap(), other);

        let features: Vec<f32> = (0..2 * 192).map(|i| (i as f32 * 0.37).sin()).collect();
        assert_near(
            &dev.device.logits_from_features(&features).unwrap(),
            &cpu.logits_from_features(&features).unwrap(),
            "output layer",
        );
    }
}

/// The tensor-core GEMM of `backend` on `(m, n, k)` with partial tiles
/// and a k tail (and `c +=`): each row against f32 fused multiply-adds in
/// k order over the bf16-rounded inputs; `exact` (the emulator, whose MMA
/// sums that way) to the bit, else within 1e-4 of the largest output.
/// Every row alone gives the bits it gives in the whole batch.
fn bf16_gemm_matches_its_reference<B: Backend>(backend: &B, exact: bool) {
    let mut rng = crate::testing::Lcg(17);
    let (m, n, k) = (140, 130, 200);
    let a: Vec<f32> = (0..m * k).map(|_| rng.f() * 4.0).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
    let c0: Vec<f32> = (0..m * n).map(|_| rng.f()).collect();
    let round = |v: &[f32]| -> Vec<f32> {
        bf16_bits(v)
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect()
    };
    let (ar, wr) = (round(&a), round(&w));
    // Each k chunk in k order, the chunks' sums in order, then onto c.
    let split = backend.k_split(n, k);
    if exact {
        // Three chunks: a row alone gets blocks per chunk, the whole GEMM
        // sums them block by block; the bits must agree.
        assert!(split.splits > 1, "the emulated device splits this GEMM along k");
        assert!(split.grid_splits(1, n) > 1 && split.grid_splits(m, n) == 1);
    }
    let mut want = c0.clone();
    for r in 0..m {
        for col in 0..n {
            let chunk = |z: usize| {
                let ks = z * split.chunk..((z + 1) * split.chunk).min(k);
                ks.fold(0.0f32, |s, i| ar[r * k + i].mul_add(wr[col * k + i], s))
            };
            let s = (1..split.splits).fold(chunk(0), |s, z| s + chunk(z));
            want[r * n + col] += s;
        }
    }
    let (da, dw) = (backend.upload(&a).unwrap(), backend.upload_bf16(&w).unwrap());
    let mut c = backend.upload(&c0).unwrap();
    backend.matmul(&da, &dw, &mut c, (m, n, k), true).unwrap();
    let all = backend.download(&c, m * n).unwrap();
    if exact {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&all), bits(&want));
    } else {
        // The tensor cores' own summation order and rounding inside a step.
        let worst = all.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        let scale = want.iter().map(|x| x.abs()).fold(0.0, f32::max);
        assert!(worst <= 1e-4 * scale, "max abs diff {worst}, largest value {scale}");
    }
    for r in [0, 1, 63, 64, 139] {
        let one = backend.upload(&a[r * k..(r + 1) * k]).unwrap();
        let mut c = backend.zeros(n).unwrap();
        backend.matmul(&one, &dw, &mut c, (1, n, k), false).unwrap();
        let alone = backend.download(&c, n).unwrap();
        let mut in_batch = backend.zeros(m * n).unwrap();
        backend.matmul(&da, &dw, &mut in_batch, (m, n, k), false).unwrap();
        let in_batch = backend.download(&in_batch, m * n).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&alone), bits(&in_batch[r * n..(r + 1) * n]), "row {r}");
    }
}

#[test]
fn the_emulated_bf16_gemm_is_exact_and_batch_invariant() {
    bf16_gemm_matches_its_reference(&emulator::Emulator, true);
}

/// A token's logits are bit for bit the same alone and among 70 other
/// tokens (two GEMM row tiles): what keeps speculation exact.
fn rows_do_not_depend_on_the_batch<B: Backend>(backend: Arc<B>) {
    let dev = OnDevice::new(backend);
    let (bs, layers) = (16, gpu_config().num_layers);
    let prompt: Vec<u32> = (0..70).map(|i| (i * 11 % 130) as u32).collect();
    let table: Vec<BlockId> = (1..=5).map(BlockId).collect();
    let whole = SeqRun::causal(prompt.clone(), 0, &table, bs).unwrap().with_all_logits();
    let (all, _) = dev.forward(
        &RaggedBatch { seqs: vec![whole] },
        &mut dev.kv(layout(bs)),
        layers,
        None,
    );
    let vocab = gpu_config().vocab_size;
    for t in [0, 35, 69] {
        let mut kv = dev.kv(layout(bs));
        if t > 0 {
            let run = SeqRun::causal(prompt[..t].to_vec(), 0, &table, bs).unwrap();
            dev.forward(&RaggedBatch { seqs: vec![run] }, &mut kv, layers, None);
        }
        let run = SeqRun::causal(vec![prompt[t]], t, &table, bs).unwrap();
        let (alone, _) = dev.forward(&RaggedBatch { seqs: vec![run] }, &mut kv, layers, None);
        assert_eq!(alone, all[t * vocab..(t + 1) * vocab], "token {t}");
    }
}

/// The attention kernel alone against the CPU's, with spread-out
/// scores (so later chunks raise the running maximum) over up to 700
/// keys (three chunks), grouped query heads, the mixed batch's extras
/// and tree.
#[test]
fn emulated_attention_matches_the_cpu_attention() {
    let (heads, kv_heads, hd, bs) = (4, 2, 64, 16);
    let lay = KvLayout {
        num_blocks: 64,
        block_size: bs,
        num_layers: 1,
        kv_size: kv_heads * hd,
        scratch_slots: 0,
    };
    let mut rng = crate::testing::Lcg(9);
    // Keys grow along positions, so the running maximum keeps rising.
    let slots = lay.num_slots();
    let k: Vec<f32> = (0..slots * lay.kv_size)
        .map(|i| rng.f() * (1.0 + (i / lay.kv_size) as f32 / 100.0))
        .collect();
    let v: Vec<f32> = (0..slots * lay.kv_size).map(|_| rng.f()).collect();
    let mut cpu_kv = KvStorage::new(lay);
    for s in 0..slots {
        let r = s * lay.kv_size..(s + 1) * lay.kv_size;
        cpu_kv.write(0, s, &k[r.clone()], &v[r]);
    }
    let mut batch = mixed_batch(bs);
    let table: Vec<BlockId> = (20..64).map(BlockId).collect();
    batch.seqs.push(SeqRun::causal(vec![1, 2], 700, &table, bs).unwrap());
    let n = batch.num_tokens();
    let q: Vec<f32> = (0..n * heads * hd).map(|_| rng.f() * 3.0).collect();
    let owners = batch.token_owners();
    let shape = crate::attention::HeadShape {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hd,
        block_size: bs,
        scale: 1.0 / (hd as f32).sqrt(),
        window: None,
    };
    let mut want = vec![0.0; n * heads * hd];
    crate::attention::paged_attention(&q, &batch, &owners, cpu_kv.layer(0), shape, &mut want);

    let e = emulator::Emulator;
    let keys = AttentionKeys::new(&batch);
    let keys = [&keys.keys, &keys.tables, &keys.lists, &keys.run_slots].map(|v| e.upload_ints(v).unwrap());
    let mut got = e.zeros(n * heads * hd).unwrap();
    let shape = AttentionShape {
        tokens: n,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hd,
        block_size: bs,
    };
    e.attention(&q, (&k, &v), &mut got, &keys, shape).unwrap();
    assert_close(&got, &want, "attention");
}

#[test]
fn the_emulated_gpu_forward_matches_the_cpu_model() {
    forward_matches_the_cpu(Arc::new(emulator::Emulator), &[16], 260);
}

#[test]
fn emulated_gpu_rows_do_not_depend_on_the_batch() {
    rows_do_not_depend_on_the_batch(Arc::new(emulator::Emulator));
}

/// The engine with its target on the emulated GPU: speculative greedy
/// output (a self-draft running the target's first layer on the device,
/// draft trees verified there, accepted nodes moved in device KV)
/// equals plain greedy decoding on the same device, in batches of 2.
#[test]
fn an_engine_on_the_emulated_gpu_speculates_exactly() {
    use crate::engine::DrafterKind;
    speculates_exactly_on_the_emulated_gpu(DrafterKind::SelfDraft { num_layers: 1 }, 5, 10);
}

/// Three requests decoded greedily in batches of 2 by an engine whose
/// target (the tiny model `seed`) runs on the emulated GPU, drafting with
/// `drafter` (fixed trees of 5 nodes, 3 deep), equal plain decoding's
/// tokens and log-probabilities on the same device, and some drafts are
/// accepted.
pub(super) fn speculates_exactly_on_the_emulated_gpu(
    drafter: crate::engine::DrafterKind,
    seed: u64,
    max_new_tokens: usize,
) {
    use crate::engine::{Engine, EngineConfig, SpecSetup};
    use crate::runner::{Runner, TokenRequest};
    use crate::spec::{CostCurve, SpecMode, SpecPolicy};
    use crate::testing::tiny_config;
    use crate::SamplingParams;

    let target = || {
        let t = random_tensors(&tiny_config(), seed).unwrap();
        let gpu = GpuModel::new(Arc::new(Emulator), &t).unwrap();
        Model::with_backend(&t, Box::new(gpu)).unwrap()
    };
    let config = EngineConfig {
        block_size: 4,
        kv_cache_bytes: 1 << 20,
    };
    let requests = |speculation| -> Vec<TokenRequest> {
        [
            vec![3u32, 9, 27, 5, 1],
            vec![7; 9],
            (0..13).map(|i| i * 5 % 64).collect(),
        ]
        .into_iter()
        .map(|prompt| TokenRequest {
            prompt,
            sampling: SamplingParams::greedy(),
            speculation,
            max_new_tokens,
            stop_token_ids: vec![],
        })
        .collect()
    };
    let mut plain = Engine::new(target(), config).unwrap();
    let want = Runner::new(&mut plain).run(&requests(SpecMode::Off), 2, 4).unwrap();
    let setup = SpecSetup {
        drafter,
        policy: SpecPolicy {
            depth: 3,
            top_k: 2,
            num_nodes: 5,
            thresholds: vec![0.2, 0.5, 0.8, 1.2, 1.6, 2.0, 3.0],
            ..SpecPolicy::default()
        },
        verify_budget: None,
        cost_curve: Some(CostCurve::new(vec![(1, 1.0), (64, 1.2), (512, 10.0)])),
    };
    let mut spec = Engine::with_speculation(target(), config, Some(setup)).unwrap();
    let got = Runner::new(&mut spec).run(&requests(SpecMode::Fixed), 2, 4).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.token_ids, w.token_ids);
        // Batch-invariant kernels: the verified tokens' log-probabilities
        // are plain decoding's to the bit.
        assert_eq!(g.logprobs, w.logprobs);
    }
    let drafted: usize = got.iter().map(|o| o.stats.draft_tokens).sum();
    let accepted: usize = got.iter().map(|o| o.stats.accepted_tokens).sum();
    assert!(drafted > 0 && accepted > 0, "drafted {drafted}, accepted {accepted}");
}

pub(super) fn gpu() -> Arc<Gpu> {
    let ordinal = match crate::testing::test_device() {
        Device::Cuda(i) => i,
        Device::Cpu => 0,
    };
    Gpu::open(ordinal).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs a CUDA GPU: HETEROSPEC_TEST_DEVICE=cuda cargo test -- --ignored"]
fn the_gpu_forward_matches_the_cpu_model() {
    forward_matches_the_cpu(gpu(), &[4, 16], 300);
    // Through `Model`: the device is chosen at load, KV comes from it.
    let (cpu, dev) = (
        Model::from_tensors(
            bf16_rounded(random_tensors(&gpu_config(), 4).unwrap()),
            WeightFormat::F32,
        )
        .unwrap(),
        Model::from_tensors_on(
            bf16_rounded(random_tensors(&gpu_config(), 4).unwrap()),
            WeightFormat::F32,
            Device::Cuda(gpu().ordinal()),
        )
        .unwrap(),
    );
    assert!(matches!(dev.device(), Device::Cuda(_)));
    let mut kv = dev.new_kv(layout(16)).unwrap();
    assert!(kv.is_on_device());
    let batch = mixed_batch(16);
    let want = cpu.forward(&batch, &mut cpu.new_kv(layout(16)).unwrap()).unwrap();
    assert_near(&dev.forward(&batch, &mut kv).unwrap(), &want, "Model on cuda");
    let err = dev
        .forward(&batch, &mut KvStorage::new(layout(16)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("device memory"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU: HETEROSPEC_TEST_DEVICE=cuda cargo test -- --ignored"]
fn gpu_rows_do_not_depend_on_the_batch() {
    rows_do_not_depend_on_the_batch(gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: HETEROSPEC_TEST_DEVICE=cuda cargo test -- --ignored"]
fn the_gpu_bf16_gemm_matches_its_reference() {
    bf16_gemm_matches_its_reference(&*gpu(), false);
}

/// Without a driver, asking for a GPU is an error that says so (with
/// one, the device opens and names itself).
#[test]
fn opening_a_device_gives_a_gpu_or_says_why() {
    // SAFETY: only tries to open the library.
    let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
    match Gpu::open(0) {
        Ok(gpu) => assert!(driver_present && format!("{gpu:?}").starts_with("cuda:0")),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                driver_present || msg.contains("no CUDA driver") && msg.contains("--device cpu"),
                "{msg}"
            );
        }
    }
    let err = Gpu::open(1 << 20).unwrap_err().to_string();
    assert!(err.contains("CUDA"), "{err}");
}
