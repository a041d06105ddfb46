//! `heterospec calibrate`: runs the fixed tree over a prompt set, logs
//! `(H, rank of the accepted path's final node)` per verification, fits
//! the depth-3 regression tree and writes the calibration file.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use heterospec_engine::runner::{Runner, TokenRequest};
use heterospec_engine::spec::calibrate::{fit_ngram_acceptance, fit_thresholds};
use heterospec_engine::spec::{NgramDrafter, SpecMode, SpecPolicy};
use heterospec_router::TextTokenizer;

use crate::local::{init_threads, EngineArgs};

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    /// JSON lines with a `prompt` each (rendered with the chat template).
    #[arg(long, default_value = "bench/calibration_prompts.jsonl")]
    pub prompts: PathBuf,
    /// Where to write the calibration file.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompts run at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Base tree: depth `d`.
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    /// Base tree: beams and children per node `k`.
    #[arg(long, default_value_t = 4)]
    pub top_k: usize,
    /// Base tree: verified nodes `N`.
    #[arg(long, default_value_t = 8)]
    pub num_nodes: usize,
    /// Also write the `(H, label)` samples as JSON lines here.
    #[arg(long)]
    pub samples_out: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    init_threads(args.engine.threads);
    crate::fetch::ensure_default_model(&args.model)?;
    let base = SpecPolicy {
        drafter: args.engine.resolved_drafter(&args.model),
        depth: args.depth,
        top_k: args.top_k,
        num_nodes: args.num_nodes,
        ..SpecPolicy::default()
    };
    base.validate().map_err(anyhow::Error::msg)?;
    let mut engine = args.engine.build_engine_with_policy(&args.model, Some(base.clone()))?;
    let Some(drafter) = engine.drafter_name() else {
        bail!("calibration needs a drafter (--drafter ngram, hybrid, head, model or self)");
    };
    let tokenizer = TextTokenizer::from_gguf_file(&args.model)?;
    let requests = crate::bench_serve::chat_requests(&tokenizer, &args.prompts, args.max_new_tokens, SpecMode::Fixed)?;
    let mut base = base;
    if drafter == "hybrid" {
        // The n-gram scale first, from plain greedy answers (what a match
        // is worth), then the entropy tiers with the drafter that uses it.
        let plain: Vec<TokenRequest> = requests
            .iter()
            .map(|r| TokenRequest {
                speculation: SpecMode::Off,
                ..r.clone()
            })
            .collect();
        let answers = Runner::new(&mut engine).run(&plain, args.concurrency, 512)?;
        let sequences: Vec<(usize, Vec<u32>)> = plain
            .iter()
            .zip(answers)
            .map(|(r, a)| (r.prompt.len(), [r.prompt.clone(), a.token_ids].concat()))
            .collect();
        base.ngram_acceptance = fit_ngram_acceptance(&NgramDrafter::default(), &sequences);
        eprintln!("n-gram acceptance by match length: {:?}", base.ngram_acceptance);
        drop(engine);
        engine = args.engine.build_engine_with_policy(&args.model, Some(base.clone()))?;
    }
    engine.log_calibration_samples();
    Runner::new(&mut engine).run(&requests, args.concurrency, 512)?;
    let samples = engine.take_calibration_samples();
    if samples.len() < 50 {
        bail!(
            "only {} verifications logged: use more prompts or tokens",
            samples.len()
        );
    }
    if let Some(path) = &args.samples_out {
        let lines: String = samples.iter().map(|(h, l)| format!("[{h}, {l}]\n")).collect();
        std::fs::write(path, lines)?;
    }
    let thresholds = fit_thresholds(&samples);
    let policy = SpecPolicy {
        drafter: drafter.to_string(),
        thresholds,
        provenance: format!(
            "heterospec calibrate --prompts {} --max-new-tokens {} --concurrency {} --depth {} --top-k {} --num-nodes {} --drafter {} ({} prompts, {} verifications, greedy, fixed tree{})",
            args.prompts.display(),
            args.max_new_tokens,
            args.concurrency,
            args.depth,
            args.top_k,
            args.num_nodes,
            drafter,
            requests.len(),
            samples.len(),
            if base.ngram_acceptance.is_empty() {
                ""
            } else {
                "; n-gram acceptance from the plain greedy answers"
            }
        ),
        ..base
    };
    policy.validate().map_err(anyhow::Error::msg)?;
    policy.save(&args.out)?;
    let mean_h = samples.iter().map(|s| s.0 as f64).sum::<f64>() / samples.len() as f64;
    eprintln!(
        "{} samples (mean H {mean_h:.3}); thresholds {:?}; wrote {}",
        samples.len(),
        policy.thresholds,
        args.out.display()
    );
    Ok(())
}
