//! In-process generation: one engine, its block pool and the tokenizer in
//! this process, driven one sequence at a time through the scheduling core
//! (`heterospec_kv::schedule`, the one the router drives too).
//! `heterospec generate` and the forward benchmark use it; the served path
//! goes through router and engine processes instead.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use heterospec_engine::runner::SpecStats;
use heterospec_engine::spec::head::checkpoint_files;
use heterospec_engine::spec::{DraftHead, SpecMode, SpecPolicy};
use heterospec_engine::{
    Device, DrafterKind, Engine, EngineConfig, Model, SamplingParams, SeqResult, SeqStep, SpecSetup, WeightFormat,
};
use heterospec_kv::schedule::{NewSequence, ScheduleConfig, Scheduler, Verdict};
use heterospec_kv::{BlockPool, BlockPoolConfig};
use heterospec_router::{FinishReason, OutputStream, StopCriteria, TextTokenizer};

/// Where `heterospec train-draft` writes, and where the default model's
/// head is looked for.
pub const DEFAULT_DRAFT_HEAD: &str = "engine/heads/smollm2-135m";

/// Engine settings shared by every command that runs the model.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Worker threads for the forward pass (0: one per core).
    #[arg(long, env = "HETEROSPEC_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Bytes of KV cache to preallocate.
    #[arg(long, env = "HETEROSPEC_KV_CACHE_MEMORY", default_value_t = heterospec_engine::kv::DEFAULT_KV_CACHE_BYTES)]
    pub kv_cache_memory: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = heterospec_kv::DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
    /// How linear weights are held: native (per weight type: 4-bit blocks
    /// stay 4-bit, other quantized types 8-bit, float weights exact), q8_0 (our GEMM, everything 8-bit: cheaper
    /// many-token forwards), candle-q8_0, as-shipped or f32 (candle's matmuls).
    #[arg(long, default_value = "native")]
    pub weight_format: WeightFormat,
    /// Where the target model and its KV cache live: cpu, or cuda / cuda:N
    /// (the GPU path: weight matrices in bf16, kernels compiled at
    /// start-up; needs the NVIDIA driver and the CUDA runtime libraries).
    /// Drafters run on the CPU. With `serve --engines N`, cuda:K puts engine
    /// i on cuda:K+i.
    #[arg(long, env = "HETEROSPEC_DEVICE", default_value = "cpu")]
    pub device: Device,
    /// On a GPU, queue every kernel of every forward rather than replay
    /// forwards of up to 512 tokens from CUDA graphs (captured once per
    /// padded size); for debugging and for measuring what graphs save.
    #[arg(long, env = "HETEROSPEC_ENFORCE_EAGER")]
    pub enforce_eager: bool,
    /// Drafter for speculative decoding: hybrid (a draft head and prompt
    /// lookup in one tree), head (an EAGLE-style draft head, --draft-head),
    /// ngram (prompt lookup), model (a GGUF with the same vocabulary,
    /// --draft-model), self (the target's first --self-draft-layers
    /// layers), none, or auto: hybrid when --draft-head is given or the
    /// default model's head is present, else ngram.
    #[arg(long, env = "HETEROSPEC_DRAFTER", default_value = "auto")]
    pub drafter: String,
    /// Draft head (a directory with `model.safetensors` and `config.json`,
    /// EAGLE layout) for `--drafter head`; default for the default model:
    /// engine/heads/smollm2-135m.
    #[arg(long, env = "HETEROSPEC_DRAFT_HEAD")]
    pub draft_head: Option<PathBuf>,
    /// Bits per weight of the draft head's matrices in memory (4 or 8).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(4..=8))]
    pub draft_head_bits: u8,
    /// Draft model GGUF for `--drafter model`.
    #[arg(long)]
    pub draft_model: Option<PathBuf>,
    /// Layers of the target a self-draft runs.
    #[arg(long, default_value_t = 8)]
    pub self_draft_layers: usize,
    /// Calibration file (tree shape, entropy thresholds, the hybrid's
    /// n-gram scale); default: a draft head's own `calibration.json`
    /// (`calibration-hybrid.json` for `--drafter hybrid`), else the one
    /// shipped for the drafter.
    #[arg(long, env = "HETEROSPEC_CALIBRATION")]
    pub calibration: Option<PathBuf>,
    /// Most tree tokens (roots and draft nodes) verified per step across the
    /// batch; default: the largest forward of the measured cost curve.
    #[arg(long)]
    pub verify_budget: Option<usize>,
}

impl EngineArgs {
    /// Loads the target (and draft) model and builds the engine; with a
    /// drafter it measures the forward-cost curve first.
    pub fn build_engine(&self, model_path: &Path) -> Result<Engine> {
        self.build_engine_with_policy(model_path, None)
    }

    /// [`EngineArgs::build_engine`] with this policy instead of the
    /// calibration file's.
    pub fn build_engine_with_policy(&self, model_path: &Path, policy: Option<SpecPolicy>) -> Result<Engine> {
        let model = Model::load_on(model_path, self.weight_format, self.device)
            .with_context(|| format!("cannot load {} on {}", model_path.display(), self.device))?;
        tracing::info!(device = %model.device(), "target model loaded");
        model.set_graphs(!self.enforce_eager);
        let config = EngineConfig {
            block_size: self.block_size,
            kv_cache_bytes: self.kv_cache_memory,
        };
        let drafter = match self.resolved_drafter(model_path).as_str() {
            "none" => return Ok(Engine::new(model, config)?),
            name @ ("head" | "hybrid") => {
                let path = self.head_path(model_path).with_context(|| {
                    format!("--drafter {name} needs --draft-head PATH (train one with `heterospec train-draft`)")
                })?;
                let format = match self.draft_head_bits {
                    4 => WeightFormat::Native,
                    8 => WeightFormat::Q8_0,
                    other => bail!("--draft-head-bits must be 4 or 8, not {other}"),
                };
                let head = DraftHead::load(&path, model.config(), format)
                    .with_context(|| format!("cannot load draft head {}", path.display()))?;
                if name == "head" {
                    DrafterKind::Head(Box::new(head))
                } else {
                    DrafterKind::Hybrid(Box::new(head))
                }
            }
            "ngram" => DrafterKind::Ngram,
            "self" => DrafterKind::SelfDraft {
                num_layers: self.self_draft_layers,
            },
            "model" => {
                let path = self
                    .draft_model
                    .as_ref()
                    .context("--drafter model needs --draft-model PATH")?;
                let draft = Model::load(path, self.weight_format)
                    .with_context(|| format!("cannot load draft model {}", path.display()))?;
                DrafterKind::Model(Box::new(draft))
            }
            other => bail!("unknown drafter `{other}` (auto, hybrid, head, ngram, model, self, none)"),
        };
        let policy = match (policy, self.calibration_path(model_path)) {
            (Some(p), _) => p,
            (None, Some(path)) => SpecPolicy::load(&path)?,
            (None, None) => SpecPolicy::default_for(&self.resolved_drafter(model_path)),
        };
        let engine = Engine::with_speculation(
            model,
            config,
            Some(SpecSetup {
                drafter,
                policy,
                verify_budget: self.verify_budget,
                cost_curve: None,
            }),
        )?;
        Ok(engine)
    }

    /// The drafter `--drafter` names for this model (`auto` resolved).
    pub fn resolved_drafter(&self, model_path: &Path) -> String {
        match self.drafter.as_str() {
            "auto" if self.head_path(model_path).is_some() => "hybrid".into(),
            "auto" => "ngram".into(),
            other => other.into(),
        }
    }

    /// `--calibration`, else a head's own calibration when it has one
    /// (entropy thresholds differ per drafter, and so per head):
    /// `calibration.json` for `head`, `calibration-hybrid.json` for `hybrid`.
    fn calibration_path(&self, model_path: &Path) -> Option<PathBuf> {
        if self.calibration.is_some() {
            return self.calibration.clone();
        }
        let file = match self.resolved_drafter(model_path).as_str() {
            "head" => "calibration.json",
            "hybrid" => "calibration-hybrid.json",
            _ => return None,
        };
        let (_, config) = checkpoint_files(&self.head_path(model_path)?);
        Some(config.with_file_name(file)).filter(|p| p.exists())
    }

    /// `--draft-head`, or the default model's committed head if present.
    fn head_path(&self, model_path: &Path) -> Option<PathBuf> {
        if let Some(p) = &self.draft_head {
            return Some(p.clone());
        }
        let default = Path::new(DEFAULT_DRAFT_HEAD);
        (model_path == crate::fetch::default_model_path() && default.join("model.safetensors").exists())
            .then(|| default.to_path_buf())
    }

    /// The same settings as command-line flags (for child processes).
    pub fn to_cli_args(&self) -> Vec<String> {
        let mut out = vec![
            "--kv-cache-memory".to_string(),
            self.kv_cache_memory.to_string(),
            "--block-size".into(),
            self.block_size.to_string(),
            "--weight-format".into(),
            self.weight_format.as_str().into(),
            "--device".into(),
            self.device.to_string(),
            "--drafter".into(),
            self.drafter.clone(),
            "--self-draft-layers".into(),
            self.self_draft_layers.to_string(),
        ];
        if self.enforce_eager {
            out.push("--enforce-eager".into());
        }
        if let Some(p) = &self.draft_model {
            out.extend(["--draft-model".into(), p.display().to_string()]);
        }
        if let Some(p) = &self.draft_head {
            out.extend(["--draft-head".into(), p.display().to_string()]);
        }
        out.extend(["--draft-head-bits".into(), self.draft_head_bits.to_string()]);
        if let Some(p) = &self.calibration {
            out.extend(["--calibration".into(), p.display().to_string()]);
        }
        if let Some(b) = self.verify_budget {
            out.extend(["--verify-budget".into(), b.to_string()]);
        }
        out
    }
}

/// Sizes the global thread pools once, before any model work.
pub fn init_threads(threads: usize) {
    if threads > 0 {
        // candle's own pool reads this on first use.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
    }
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub speculation: SpecStats,
}

impl Generation {
    /// Tokens per second after the first (decode speed).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.token_ids.len().saturating_sub(1);
        if n == 0 || self.decode_seconds <= 0.0 {
            0.0
        } else {
            n as f64 / self.decode_seconds
        }
    }
}

pub struct LocalEngine {
    pub engine: Engine,
    pub pool: BlockPool,
    pub tokenizer: TextTokenizer,
    next_seq: u64,
}

impl LocalEngine {
    pub fn load(model_path: &Path, args: &EngineArgs) -> Result<Self> {
        init_threads(args.threads);
        crate::fetch::ensure_default_model(model_path)?;
        let engine = args.build_engine(model_path)?;
        Self::with_engine(model_path, engine)
    }

    /// Wraps an engine built elsewhere (for the model at `model_path`).
    pub fn with_engine(model_path: &Path, engine: Engine) -> Result<Self> {
        let tokenizer = TextTokenizer::from_gguf_file(model_path)?;
        let layout = engine.kv_layout();
        let pool = BlockPool::new(BlockPoolConfig {
            num_blocks: layout.num_blocks,
            block_size: layout.block_size,
        });
        Ok(LocalEngine {
            engine,
            pool,
            tokenizer,
            next_seq: 0,
        })
    }

    pub fn max_context(&self) -> usize {
        self.engine.model().config().max_context
    }

    /// Generates from `prompt_ids`; `on_text` receives each text delta as it
    /// becomes final.
    pub fn generate(
        &mut self,
        prompt_ids: Vec<u32>,
        sampling: SamplingParams,
        speculation: SpecMode,
        criteria: StopCriteria,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        if prompt_ids.is_empty() {
            bail!("the prompt is empty");
        }
        let max_context = self.max_context();
        if prompt_ids.len() + criteria.max_new_tokens > max_context {
            bail!(
                "prompt of {} tokens plus max_new_tokens {} exceeds the model's context of {max_context} tokens",
                prompt_ids.len(),
                criteria.max_new_tokens
            );
        }
        if criteria.max_new_tokens == 0 {
            bail!("max_new_tokens must be at least 1");
        }
        sampling.validate().map_err(anyhow::Error::msg)?;
        // One sequence through the scheduling core, on a fresh pool of the
        // engine's shape: the whole prompt in one step, then decode steps.
        let config = ScheduleConfig {
            max_batch_tokens: usize::MAX,
            max_running: 1,
            max_prefill_chunk: usize::MAX,
            max_lookahead: self.engine.max_lookahead(),
        };
        let mut core = Scheduler::new(config, BlockPool::new(self.pool.config()), self.next_seq);
        let seq = NewSequence {
            prompt_token_ids: prompt_ids.clone(),
            max_new_tokens: criteria.max_new_tokens,
            speculate: speculation != SpecMode::Off,
            cache_salt: None,
        };
        let output = OutputStream::new(criteria);
        core.add(seq, output)?;
        let result = self.run(&mut core, prompt_ids, sampling, speculation, &mut on_text);
        // The engine forgets the sequence: released by the core when it
        // finished (take them before `drain`, which drops that list), or
        // still held after an error.
        let released = core.take_released();
        let held = core.drain().into_iter().map(|seq| seq.seq_id());
        for seq_id in released.into_iter().chain(held) {
            let _ = self.engine.release(seq_id);
        }
        result
    }

    fn run(
        &mut self,
        core: &mut Scheduler<OutputStream>,
        prompt_ids: Vec<u32>,
        sampling: SamplingParams,
        speculation: SpecMode,
        on_text: &mut impl FnMut(&str),
    ) -> Result<Generation> {
        let mut text = String::new();
        let start = Instant::now();
        let mut first_token_at = None;
        let mut stats = SpecStats::default();
        let (token_ids, finish_reason) = loop {
            let plan = core.schedule();
            if !plan.rejected.is_empty() {
                bail!("the KV cache is too small for this request (raise --kv-cache-memory)");
            }
            for seq_id in core.take_released() {
                self.engine.release(seq_id)?;
            }
            let steps: Vec<SeqStep> = plan
                .runs
                .into_iter()
                .map(|run| SeqStep::scheduled(run, &sampling, speculation))
                .collect();
            if let Some(last) = steps.last() {
                self.next_seq = self.next_seq.max(last.seq_id.0 + 1);
            }
            let results = self.engine.step(&steps)?;
            first_token_at.get_or_insert_with(Instant::now);
            let committed = results.iter().map(SeqResult::committed).collect();
            let spec = results.first().map(|r| r.spec).unwrap_or_default();
            let mut detok_error = None;
            let tokenizer = &self.tokenizer;
            let finished = core.update(committed, |seq, tokens| {
                stats.record(&spec);
                for (i, &t) in tokens.iter().enumerate() {
                    let delta = match seq.payload.push(tokenizer, t) {
                        Ok(delta) => delta,
                        Err(e) => {
                            detok_error = Some(e);
                            return Verdict {
                                keep: i + 1,
                                finish: Some(FinishReason::Cancelled),
                            };
                        }
                    };
                    if !delta.text.is_empty() {
                        on_text(&delta.text);
                        text.push_str(&delta.text);
                    }
                    if delta.finish_reason.is_some() {
                        return Verdict {
                            keep: i + 1,
                            finish: delta.finish_reason,
                        };
                    }
                }
                Verdict::keep_all(tokens.len())
            })?;
            if let Some(e) = detok_error {
                return Err(e.into());
            }
            if let Some(f) = finished.into_iter().next() {
                break (f.sequence.generated_token_ids().to_vec(), f.reason);
            }
        };
        let first = first_token_at.expect("at least one token");
        Ok(Generation {
            prompt_token_ids: prompt_ids,
            token_ids,
            text,
            finish_reason,
            prefill_seconds: (first - start).as_secs_f64(),
            decode_seconds: first.elapsed().as_secs_f64(),
            speculation: stats,
        })
    }
}
