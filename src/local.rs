//! In-process generation: one engine, its block pool and the tokenizer in
//! this process, driven one sequence at a time. `heterospec generate` and the
//! forward benchmark use it; the served path goes through router and engine
//! processes instead.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use heterospec_engine::{Engine, EngineConfig, Model, SampledToken, SamplingParams, SeqId, SeqStep, WeightFormat};
use heterospec_kv::{BlockPool, BlockPoolConfig, BlockTable};
use heterospec_router::{FinishReason, OutputStream, StopCriteria, TextTokenizer};

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
    /// How linear weights are held: native (our GEMM; 4-bit blocks stay
    /// 4-bit, others 8-bit), q8_0 (our GEMM, everything 8-bit: cheaper
    /// many-token forwards), candle-q8_0, as-shipped or f32 (candle's matmuls).
    #[arg(long, default_value = "native")]
    pub weight_format: WeightFormat,
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
        let model = Model::load(model_path, args.weight_format)?;
        let tokenizer = TextTokenizer::from_gguf_file(model_path)?;
        let engine = Engine::new(
            model,
            EngineConfig {
                block_size: args.block_size,
                kv_cache_bytes: args.kv_cache_memory,
            },
        )?;
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
        let seq_id = SeqId(self.next_seq);
        self.next_seq += 1;
        let mut table = BlockTable::new();
        let result = self.run(seq_id, &mut table, prompt_ids, sampling, criteria, &mut on_text);
        self.pool.free_table(&mut table);
        let _ = self.engine.release(seq_id);
        result
    }

    fn run(
        &mut self,
        seq_id: SeqId,
        table: &mut BlockTable,
        prompt_ids: Vec<u32>,
        sampling: SamplingParams,
        criteria: StopCriteria,
        on_text: &mut impl FnMut(&str),
    ) -> Result<Generation> {
        let mut output = OutputStream::new(criteria);
        let mut token_ids = Vec::new();
        let mut text = String::new();
        let mut num_computed = 0;
        let mut next = prompt_ids.clone();
        let mut sampling = Some(sampling);
        let start = Instant::now();
        let mut first_token_at = None;
        let finish_reason = loop {
            self.pool
                .allocate_slots(table, num_computed + next.len())
                .context("the KV cache is too small for this request (raise --kv-cache-memory)")?;
            let step = SeqStep {
                seq_id,
                new_token_ids: next.clone(),
                num_computed,
                block_table: table.block_ids().to_vec(),
                sampling: sampling.take(),
                cached_token_ids: Vec::new(),
                sample: true,
            };
            let result = self.engine.step(std::slice::from_ref(&step))?;
            num_computed += next.len();
            let SampledToken { token_id, .. } = result[0].tokens[0];
            first_token_at.get_or_insert_with(Instant::now);
            token_ids.push(token_id);
            let delta = output.push(&self.tokenizer, token_id)?;
            if !delta.text.is_empty() {
                on_text(&delta.text);
                text.push_str(&delta.text);
            }
            if let Some(reason) = delta.finish_reason {
                break reason;
            }
            next = vec![token_id];
        };
        let first = first_token_at.expect("at least one token");
        Ok(Generation {
            prompt_token_ids: prompt_ids,
            token_ids,
            text,
            finish_reason,
            prefill_seconds: (first - start).as_secs_f64(),
            decode_seconds: first.elapsed().as_secs_f64(),
        })
    }
}
