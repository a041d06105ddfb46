//! `heterospec train-draft`: answers a prompt set with the target (greedy,
//! our engine), takes the target's features of every answer, and trains an
//! EAGLE-style draft head on them with candle's autograd on the CPU.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use heterospec_engine::runner::{Runner, TokenRequest};
use heterospec_engine::spec::head::HeadKind;
use heterospec_engine::spec::train::{frequent_tokens, target_features, train, HeadParams, TrainConfig, TrainSequence};
use heterospec_engine::spec::SpecMode;
use heterospec_engine::{Engine, EngineConfig, FeatureTap, Model, WeightFormat};
use heterospec_router::TextTokenizer;
use indicatif::{ProgressBar, ProgressStyle};

use crate::local::init_threads;

#[derive(Debug, Args)]
pub struct TrainDraftArgs {
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    /// JSON lines with `category` and `prompt` (never the benchmark's).
    #[arg(long, default_value = "bench/draft_train_prompts.jsonl")]
    pub prompts: PathBuf,
    /// Output directory (`model.safetensors`, `config.json`).
    #[arg(long, default_value = crate::local::DEFAULT_DRAFT_HEAD)]
    pub out: PathBuf,
    /// Cache of the generated data (answers and features): what it holds
    /// is read, answers to prompts beyond it are generated and added.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Greedy tokens per answer.
    #[arg(long, default_value_t = 192)]
    pub max_new_tokens: usize,
    /// Answers generated at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// `eagle`: the final feature, feature regression plus cross-entropy,
    /// noisy inputs. `eagle3`: low, middle and high-layer states fused,
    /// cross-entropy with training-time test.
    #[arg(long, default_value = "eagle")]
    pub kind: HeadKind,
    /// Training-time-test steps (`--kind eagle3`).
    #[arg(long, default_value_t = 3)]
    pub ttt_steps: usize,
    /// Output rows: the most frequent answer tokens.
    #[arg(long, default_value_t = 4096)]
    pub sub_vocab: usize,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (0: one per core).
    #[arg(long, env = "HETEROSPEC_THREADS", default_value_t = 0)]
    pub threads: usize,
}

/// A progress bar on a terminal; otherwise (logs, CI) a line per tenth.
fn bar(len: usize, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        let bar = ProgressBar::hidden();
        bar.set_length(len as u64);
        bar.set_prefix(what.to_string());
        return bar;
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Advances `bar`; when it is hidden, prints a line at each tenth.
fn tick(bar: &ProgressBar, n: u64) {
    let len = bar.length().unwrap_or(1).max(1);
    let before = bar.position() * 10 / len;
    bar.inc(n);
    if bar.is_hidden() && bar.position() * 10 / len > before {
        eprintln!(
            "{}: {}/{len} ({:.0} s) {}",
            bar.prefix(),
            bar.position(),
            bar.elapsed().as_secs_f64(),
            bar.message()
        );
    }
}

/// Greedy answers to `requests` and their features.
fn generate_data(
    model_path: &Path,
    requests: &[TokenRequest],
    concurrency: usize,
    tap: &FeatureTap,
) -> Result<Vec<TrainSequence>> {
    let model = Model::load(model_path, WeightFormat::Native)?;
    let mut engine = Engine::new(model, EngineConfig::default())?;
    let progress = bar(requests.len(), "answers");
    let mut answers = Vec::new();
    for chunk in requests.chunks(concurrency.max(1) * 2) {
        let out = Runner::new(&mut engine).run(chunk, concurrency.max(1), 256)?;
        answers.extend(out.into_iter().map(|o| o.token_ids));
        tick(&progress, chunk.len() as u64);
    }
    progress.finish();
    let mut data: Vec<TrainSequence> = requests
        .iter()
        .zip(answers)
        .map(|(r, answer)| TrainSequence {
            tokens: [&r.prompt[..], &answer].concat(),
            features: Vec::new(),
            answer_start: r.prompt.len(),
        })
        .collect();
    add_features(engine.model(), &mut data, tap)?;
    Ok(data)
}

/// The target's states of `tap` for every sequence (one prefill each).
fn add_features(model: &Model, data: &mut [TrainSequence], tap: &FeatureTap) -> Result<()> {
    let progress = bar(data.len(), "features");
    for seq in data.iter_mut() {
        seq.features = target_features(model, &seq.tokens, 512, tap)?;
        tick(&progress, 1);
    }
    progress.finish();
    Ok(())
}

/// Cache tensor naming the tap: empty for the final feature, else the layers.
fn tap_layers(tap: &FeatureTap) -> Vec<u32> {
    match tap {
        FeatureTap::Final => Vec::new(),
        FeatureTap::Layers(l) => l.iter().map(|&i| i as u32 + 1).collect(),
    }
}

/// The data for `requests`: from the cache where it has them (greedy answers
/// do not depend on the batch, so a cache of a prompt file's first lines
/// holds exactly what generating them again would give), the rest generated
/// and the cache rewritten.
fn training_data(
    target: &Model,
    model_path: &Path,
    args: &TrainDraftArgs,
    tap: &FeatureTap,
) -> Result<Vec<TrainSequence>> {
    let tokenizer = TextTokenizer::from_gguf_file(model_path)?;
    let requests = crate::bench_serve::chat_requests(&tokenizer, &args.prompts, args.max_new_tokens, SpecMode::Off)?;
    let (mut data, cached_tap) = match &args.data {
        Some(p) if p.exists() => load_data(p)?,
        _ => (Vec::new(), tap_layers(tap)),
    };
    if data.len() > requests.len() {
        bail!(
            "the data cache holds {} sequences, the prompt file has {} prompts",
            data.len(),
            requests.len()
        );
    }
    for (i, (seq, req)) in data.iter().zip(&requests).enumerate() {
        if seq.tokens[..seq.answer_start] != req.prompt[..] {
            bail!("the data cache was made from other prompts (prompt {} differs)", i + 1);
        }
    }
    let mut changed = false;
    if cached_tap != tap_layers(tap) && !data.is_empty() {
        // The answers stand; only the states are taken again.
        eprintln!(
            "taking the target's states of {tap:?} for the {} cached answers",
            data.len()
        );
        add_features(target, &mut data, tap)?;
        changed = true;
    }
    if data.len() < requests.len() {
        eprintln!("generating answers to {} prompts", requests.len() - data.len());
        data.extend(generate_data(
            model_path,
            &requests[data.len()..],
            args.concurrency,
            tap,
        )?);
        changed = true;
    }
    if let (true, Some(p)) = (changed, &args.data) {
        save_data(p, &data, tap)?;
    }
    Ok(data)
}

fn save_data(path: &Path, data: &[TrainSequence], tap: &FeatureTap) -> Result<()> {
    let cpu = Device::Cpu;
    let tokens: Vec<u32> = data.iter().flat_map(|s| s.tokens.iter().copied()).collect();
    let features: Vec<f32> = data.iter().flat_map(|s| s.features.iter().copied()).collect();
    let lens: Vec<u32> = data.iter().map(|s| s.tokens.len() as u32).collect();
    let starts: Vec<u32> = data.iter().map(|s| s.answer_start as u32).collect();
    let n = tokens.len();
    let tensors = [
        ("tokens", Tensor::from_vec(tokens, n, &cpu)?),
        (
            "features",
            Tensor::from_vec(features, (n, data[0].features.len() / data[0].tokens.len()), &cpu)?,
        ),
        ("lengths", Tensor::new(lens, &cpu)?),
        ("answer_starts", Tensor::new(starts, &cpu)?),
        // Layer taps + 1 (empty: the final feature); a zero pads an empty list.
        ("tap", Tensor::new([tap_layers(tap), vec![0]].concat(), &cpu)?),
    ];
    candle_core::safetensors::save(&tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), path)?;
    Ok(())
}

/// The cached sequences and the tap their features are of.
fn load_data(path: &Path) -> Result<(Vec<TrainSequence>, Vec<u32>)> {
    let t = candle_core::safetensors::load(path, &Device::Cpu)?;
    let get = |k: &str| t.get(k).with_context(|| format!("{}: no `{k}`", path.display()));
    let tokens = get("tokens")?.to_vec1::<u32>()?;
    let features = get("features")?.to_dtype(DType::F32)?;
    let h = features.dim(1)?;
    let features = features.flatten_all()?.to_vec1::<f32>()?;
    let mut at = 0;
    let mut out = Vec::new();
    for (len, start) in get("lengths")?
        .to_vec1::<u32>()?
        .into_iter()
        .zip(get("answer_starts")?.to_vec1::<u32>()?)
    {
        let len = len as usize;
        out.push(TrainSequence {
            tokens: tokens[at..at + len].to_vec(),
            features: features[at * h..(at + len) * h].to_vec(),
            answer_start: start as usize,
        });
        at += len;
    }
    let tap = match t.get("tap") {
        Some(t) => t.to_vec1::<u32>()?.into_iter().filter(|&l| l > 0).collect(),
        None => Vec::new(), // caches from before taps: the final feature
    };
    Ok((out, tap))
}

pub fn run(args: TrainDraftArgs) -> Result<()> {
    init_threads(args.threads);
    crate::fetch::ensure_default_model(&args.model)?;
    let started = Instant::now();
    let target = Model::load(&args.model, WeightFormat::Native)?;
    let tap = args.kind.default_tap(target.config().num_layers);
    let data = training_data(&target, &args.model, &args, &tap)?;
    if data.is_empty() {
        bail!("no training data");
    }
    let data_secs = started.elapsed().as_secs_f64();
    let answer_tokens: usize = data.iter().map(|s| s.tokens.len() - s.answer_start).sum();
    let (sub_vocab, coverage) = frequent_tokens(&data, args.sub_vocab, target.config().vocab_size);
    eprintln!(
        "{} sequences, {answer_tokens} answer tokens; the {} most frequent cover {:.1}% of them",
        data.len(),
        sub_vocab.len(),
        100.0 * coverage
    );
    let cfg = TrainConfig {
        sub_vocab: args.sub_vocab,
        batch_size: args.batch_size,
        epochs: args.epochs,
        learning_rate: args.learning_rate,
        ttt_steps: args.ttt_steps,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let mut params = HeadParams::init(&target, sub_vocab, args.seed, DType::F32, args.kind)?;
    let steps = data.len().div_ceil(cfg.batch_size.max(1)) * cfg.epochs;
    let progress = bar(steps, "training");
    let train_start = Instant::now();
    let mut recent: Vec<(f64, f64)> = Vec::new();
    let epochs = train(&target, &mut params, &data, &cfg, |_, _, s| {
        recent.push((s.loss, s.top1));
        if recent.len() > 20 {
            recent.remove(0);
        }
        let n = recent.len() as f64;
        progress.set_message(format!(
            "loss {:.4} top-1 {:.3}",
            recent.iter().map(|r| r.0).sum::<f64>() / n,
            recent.iter().map(|r| r.1).sum::<f64>() / n
        ));
        tick(&progress, 1);
    })?;
    progress.finish();
    let train_secs = train_start.elapsed().as_secs_f64();
    let curve: Vec<String> = epochs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            format!(
                "epoch {}: loss {:.4} (feature {:.4}, token {:.3}), top-1 {:.3}",
                i + 1,
                e.loss,
                e.feature_loss,
                e.token_loss,
                e.top1
            )
        })
        .collect();
    for line in &curve {
        eprintln!("{line}");
    }
    let mut weights = params.weights()?;
    weights.config.provenance = format!(
        "heterospec train-draft --kind {}{} --prompts {} --max-new-tokens {} --sub-vocab {} --epochs {} \
         --batch-size {} --learning-rate {} --seed {} ({} sequences, {answer_tokens} answer tokens, sub-vocabulary coverage {:.1}%; \
         data {data_secs:.0} s, training {train_secs:.0} s; {})",
        args.kind.as_str(),
        match args.kind {
            HeadKind::Eagle => String::new(),
            HeadKind::Eagle3 => format!(" --ttt-steps {}", args.ttt_steps),
        },
        args.prompts.display(),
        args.max_new_tokens,
        args.sub_vocab,
        args.epochs,
        args.batch_size,
        args.learning_rate,
        args.seed,
        data.len(),
        100.0 * coverage,
        curve.join("; ")
    );
    weights.save(&args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
