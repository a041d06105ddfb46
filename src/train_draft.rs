//! `heterospec train-draft`: trains an EAGLE-style draft head with candle's
//! autograd on the CPU, on a training set from `heterospec draft-data` (the
//! target's answers as token ids) and the target's states of every
//! position, taken again from the ids by packed prefill.
//!
//! Invariants: held-out groups (5%, see `dataset`) are never trained on and
//! are measured after every epoch; each epoch ends in a checkpoint from
//! which `--resume` continues.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use heterospec_engine::spec::head::{HeadKind, HeadWeights, D2T, FC_BIAS};
use heterospec_engine::spec::train::{
    evaluate, frequent_tokens, target_features_packed, train, HeadParams, HeldOutStats, TrainConfig, TrainSequence,
};
use heterospec_engine::{FeatureTap, Model, WeightFormat};
use serde::{Deserialize, Serialize};

use crate::dataset::{DraftDataset, DraftRecord};
use crate::feature_cache::{self, FeatureCache};
use crate::local::init_threads;
use crate::progress::{bar, tick};

#[derive(Debug, Args)]
pub struct TrainDraftArgs {
    #[arg(long, env = "HETEROSPEC_MODEL", default_value_os_t = crate::fetch::default_model_path())]
    pub model: PathBuf,
    /// The training set (`heterospec draft-data` writes it).
    #[arg(long, default_value = crate::draft_data::DEFAULT_DATASET)]
    pub dataset: PathBuf,
    /// Output directory (`model.safetensors`, `config.json`).
    #[arg(long, default_value = crate::local::DEFAULT_DRAFT_HEAD)]
    pub out: PathBuf,
    /// Written after every epoch (f32 weights, sub-vocabulary, epochs done).
    #[arg(long, default_value = "target/draft-head-checkpoint.safetensors")]
    pub checkpoint: PathBuf,
    /// Continue from `--checkpoint` (the schedule goes on where it stopped;
    /// the optimizer's moments start again).
    #[arg(long)]
    pub resume: bool,
    /// Start from the head in DIR (its weights and sub-vocabulary, of
    /// `--kind`) instead of random weights: fine-tuning, on a schedule of
    /// its own (a lower `--learning-rate` suits it).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["resume", "evaluate"])]
    pub init: Option<PathBuf>,
    /// `eagle`: the final feature, feature regression plus cross-entropy,
    /// noisy inputs. `eagle3`: low, middle and high-layer states fused,
    /// cross-entropy with training-time test.
    #[arg(long, default_value = "eagle")]
    pub kind: HeadKind,
    /// Decoder layers of a new head (`--kind eagle`; EAGLE-3 heads have
    /// one). `--evaluate`, `--init` and `--resume` take the head's own.
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    /// Training-time-test steps (`--kind eagle3`).
    #[arg(long, default_value_t = 3)]
    pub ttt_steps: usize,
    /// Output rows: the most frequent answer tokens (`--init` and
    /// `--resume` keep the head's own).
    #[arg(long, default_value_t = 4096)]
    pub sub_vocab: usize,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    /// Longest sequence trained on (prompt and answer; longer ones are cut).
    #[arg(long, default_value_t = 768)]
    pub max_len: usize,
    /// Train nothing: report the held-out figures of the head in DIR (of
    /// `--kind`), to compare heads on one split.
    #[arg(long, value_name = "DIR")]
    pub evaluate: Option<PathBuf>,
    /// Keep the target's states of the training and held-out sequences in
    /// DIR (exact f32, keyed by the model file, the tap and the tokens; about
    /// 2.3 kB per token for `eagle`, three times that for `eagle3`), so a
    /// resumed run, `--evaluate` or another head on the same set skips the
    /// prefill. `--features-cache none`: recompute every time.
    #[arg(long, default_value = "target/draft-features")]
    pub features_cache: PathBuf,
    /// Use only the first N records of the dataset (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (0: one per core).
    #[arg(long, env = "HETEROSPEC_THREADS", default_value_t = 0)]
    pub threads: usize,
}

/// What a checkpoint holds besides the weights.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    kind: String,
    /// Decoder layers (checkpoints made before heads had several: one).
    #[serde(default = "one")]
    layers: usize,
    /// What the run trained on and how; a resumed run must match.
    records: usize,
    batch_size: usize,
    max_len: usize,
    epochs_done: usize,
    /// Per-epoch lines so far (the provenance).
    curve: Vec<String>,
}

fn one() -> usize {
    1
}

/// Each record cut to `max_len`, with the target's states of `tap`
/// (records whose prompt fills `max_len` are left out).
fn with_features(
    model: &Model,
    records: &[&DraftRecord],
    max_len: usize,
    tap: &FeatureTap,
    cache: Option<&FeatureCache>,
) -> Result<Vec<TrainSequence>> {
    let kept: Vec<&&DraftRecord> = records
        .iter()
        .filter(|r| r.prompt.len() + 1 < max_len && !r.answer.is_empty())
        .collect();
    let seqs: Vec<Vec<u32>> = kept
        .iter()
        .map(|r| [&r.prompt[..], &r.answer].concat().into_iter().take(max_len).collect())
        .collect();
    let starts: Vec<usize> = kept.iter().map(|r| r.prompt.len()).collect();
    let width = tap.width(model.config().hidden_size);
    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let path = cache.filter(|_| !seqs.is_empty()).map(|c| c.path(tap, &seqs));
    // A damaged file is recomputed (and replaced), not fatal.
    let kept_features = path.as_ref().and_then(|p| {
        feature_cache::load(p, &lens, width).unwrap_or_else(|e| {
            eprintln!("{}: {e:#}; computing the features again", p.display());
            None
        })
    });
    let features = match (kept_features, &path) {
        (Some(features), Some(p)) => {
            eprintln!("features of {} sequences from {}", seqs.len(), p.display());
            features
        }
        _ => {
            let progress = bar(seqs.len(), "features");
            let refs: Vec<&[u32]> = seqs.iter().map(|s| &s[..]).collect();
            let features = target_features_packed(model, &refs, 1024, tap, |n| tick(&progress, n as u64))?;
            progress.finish();
            if let Some(p) = &path {
                match feature_cache::save(p, &features, width) {
                    Ok(()) => eprintln!("features kept in {}", p.display()),
                    Err(e) => eprintln!("cannot keep the features in {}: {e:#}", p.display()),
                }
            }
            features
        }
    };
    Ok(seqs
        .into_iter()
        .zip(features)
        .zip(starts)
        .map(|((tokens, features), answer_start)| TrainSequence {
            tokens,
            features,
            answer_start,
        })
        .collect())
}

fn save_checkpoint(path: &Path, params: &HeadParams, state: &CheckpointState) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tensors: std::collections::HashMap<String, Tensor> = params
        .vars
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    tensors.insert("sub_vocab".into(), Tensor::new(params.sub_vocab.clone(), &Device::Cpu)?);
    // Each file whole or not at all; the state (which says what the weights
    // are) last.
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path)?;
    let json = path.with_extension("json");
    std::fs::write(
        json.with_extension("json.tmp"),
        serde_json::to_string_pretty(state)? + "\n",
    )?;
    std::fs::rename(json.with_extension("json.tmp"), &json)?;
    Ok(())
}

/// The head of a checkpoint (its weights and sub-vocabulary) and its state.
fn load_checkpoint(
    path: &Path,
    target: &Model,
    args: &TrainDraftArgs,
    records: usize,
) -> Result<(HeadParams, CheckpointState)> {
    let state: CheckpointState = serde_json::from_str(
        &std::fs::read_to_string(path.with_extension("json"))
            .with_context(|| format!("--resume: no checkpoint at {}", path.display()))?,
    )?;
    if state.kind != args.kind.as_str() {
        bail!("--resume: the checkpoint is of a --kind {} head", state.kind);
    }
    for (flag, was, now) in [
        ("--batch-size", state.batch_size, args.batch_size),
        ("--max-len", state.max_len, args.max_len),
        ("the dataset's records (--dataset, --limit)", state.records, records),
    ] {
        if was != now {
            bail!("--resume: the checkpoint was made with {flag} {was}, this run has {now}");
        }
    }
    let t = candle_core::safetensors::load(path, &Device::Cpu)?;
    let sub_vocab = t
        .get("sub_vocab")
        .context("checkpoint without sub_vocab")?
        .to_vec1::<u32>()?;
    let mut params = HeadParams::init(target, sub_vocab, args.seed, DType::F32, args.kind, state.layers)?;
    for (name, var) in &params.vars {
        let v = t.get(name).with_context(|| format!("checkpoint without `{name}`"))?;
        if v.dims() != var.dims() {
            bail!("checkpoint `{name}` is {:?}, the head needs {:?}", v.dims(), var.dims());
        }
        var.set(v)?;
    }
    // A head started from (`--init`) may have optional tensors.
    train_optional_tensors(&mut params, t.iter().filter(|(name, _)| *name != "sub_vocab"))?;
    Ok((params, state))
}

/// The trainable parameters of the head in `dir`, which must be of `kind`,
/// and how that head was made.
fn head_params(dir: &Path, target: &Model, kind: HeadKind) -> Result<(HeadParams, String)> {
    let weights = HeadWeights::load(dir, target.config())?;
    if weights.kind() != kind {
        bail!("{} is a --kind {} head", dir.display(), weights.kind().as_str());
    }
    let layers = target.config().num_layers;
    if weights.feature_tap(layers) != kind.default_tap(layers) {
        bail!(
            "{} reads other target states ({:?}) than training gives a --kind {} head ({:?})",
            dir.display(),
            weights.feature_tap(layers),
            kind.as_str(),
            kind.default_tap(layers)
        );
    }
    let sub_vocab = weights.draft_to_target()?;
    if sub_vocab.is_empty() {
        bail!(
            "{} has no sub-vocabulary output layer (`lm_head.weight` with `d2t`), which training needs",
            dir.display()
        );
    }
    let mut params = HeadParams::init(
        target,
        sub_vocab,
        0,
        DType::F32,
        weights.kind(),
        weights.config.num_hidden_layers,
    )?;
    for (name, var) in &params.vars {
        match weights.tensors.get(name) {
            Some(t) => var.set(t)?,
            // An `fc` bias is optional: zero, as a head without one.
            None if name == FC_BIAS => {}
            None => bail!("{}: no `{name}`", dir.display()),
        }
    }
    train_optional_tensors(&mut params, weights.tensors.iter().filter(|(name, _)| *name != D2T))?;
    Ok((params, weights.config.provenance))
}

/// Adds to `params` the head's tensors that a new head lacks (a first-layer
/// input norm, an output norm), so they take part as the engine runs them
/// and train on.
fn train_optional_tensors<'a>(
    params: &mut HeadParams,
    tensors: impl Iterator<Item = (&'a String, &'a Tensor)>,
) -> Result<()> {
    for (name, t) in tensors {
        if params.vars.iter().all(|(n, _)| n != name) {
            params.vars.push((name.clone(), candle_core::Var::from_tensor(t)?));
        }
    }
    Ok(())
}

fn held_out_line(s: &HeldOutStats) -> String {
    let depths: Vec<String> = s.top1.iter().map(|a| format!("{a:.3}")).collect();
    format!(
        "held-out top-1 {} (by depth), token loss {:.3}, tau estimate {:.2}",
        depths.join("/"),
        s.token_loss,
        s.tau_estimate(4)
    )
}

/// Has glibc's malloc keep freed memory for reuse, for the rest of the
/// command (features, training, evaluation). Training allocates and frees
/// tensors of megabytes at every operation; by default each one is mapped
/// and unmapped again, a fault and a zeroed page per 4 kB, which measured
/// a sixth of an epoch's time on 2 cores.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    // SAFETY: mallopt only sets allocator parameters (it is not thread-safe:
    // this runs first, before any thread pool starts).
    unsafe {
        // Blocks up to 32 MiB (glibc's largest threshold on 64-bit) come
        // from the heap, which is never given back.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

pub fn run(args: TrainDraftArgs) -> Result<()> {
    keep_freed_memory();
    // A head that exists (`--init`, `--resume`, `--evaluate`) has its own layers.
    let new_head = args.init.is_none() && !args.resume && args.evaluate.is_none();
    if new_head {
        if let Err(e) = args.kind.check_layers(args.layers) {
            bail!("--layers {}: {e}", args.layers);
        }
    }
    init_threads(args.threads);
    crate::fetch::ensure_default_model(&args.model)?;
    let started = Instant::now();
    let target = Model::load(&args.model, WeightFormat::Native)?;
    let data = DraftDataset::load(&args.dataset).context("make a training set with `heterospec draft-data` first")?;
    if data.vocab_size != target.config().vocab_size {
        bail!(
            "{} holds ids of a {}-token vocabulary, the model has {}",
            args.dataset.display(),
            data.vocab_size,
            target.config().vocab_size
        );
    }
    let records: Vec<&DraftRecord> = data
        .records
        .iter()
        .take(if args.limit == 0 { usize::MAX } else { args.limit })
        .collect();
    let (held, trained): (Vec<&DraftRecord>, Vec<&DraftRecord>) = records.iter().partition(|r| r.held_out());
    // τ is measured on greedy answers: what greedy decoding verifies.
    let held: Vec<&DraftRecord> = held.into_iter().filter(|r| r.temperature == 0.0).collect();
    let tap = args.kind.default_tap(target.config().num_layers);
    let cache = match args.features_cache.as_os_str() == "none" {
        true => None,
        false => Some(FeatureCache::open(&args.features_cache, &args.model)?),
    };
    if let Some(dir) = &args.evaluate {
        let (params, _) = head_params(dir, &target, args.kind)?;
        let held_data = with_features(&target, &held, args.max_len, &tap, cache.as_ref())?;
        let cfg = TrainConfig {
            max_len: args.max_len,
            batch_size: args.batch_size,
            ttt_steps: args.ttt_steps,
            ..TrainConfig::default()
        };
        println!(
            "{}: {} held-out sequences: {}",
            dir.display(),
            held_data.len(),
            held_out_line(&evaluate(&target, &params, &held_data, &cfg)?)
        );
        return Ok(());
    }
    let train_data = with_features(&target, &trained, args.max_len, &tap, cache.as_ref())?;
    let held_data = with_features(&target, &held, args.max_len, &tap, cache.as_ref())?;
    if train_data.is_empty() {
        bail!("no training sequences in {}", args.dataset.display());
    }
    let data_secs = started.elapsed().as_secs_f64();
    let answer_tokens: usize = train_data.iter().map(|s| s.tokens.len() - s.answer_start).sum();
    let all_tokens: usize = train_data.iter().map(|s| s.tokens.len()).sum();
    let cfg = TrainConfig {
        sub_vocab: args.sub_vocab,
        max_len: args.max_len,
        batch_size: args.batch_size,
        epochs: args.epochs,
        learning_rate: args.learning_rate,
        ttt_steps: args.ttt_steps,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let (mut params, mut state) = if args.resume {
        let (p, s) = load_checkpoint(&args.checkpoint, &target, &args, records.len())?;
        eprintln!(
            "resuming after epoch {} from {}",
            s.epochs_done,
            args.checkpoint.display()
        );
        (p, s)
    } else {
        let (params, curve) = match &args.init {
            Some(dir) => {
                let (params, made) = head_params(dir, &target, args.kind)?;
                eprintln!("starting from the head in {}", dir.display());
                (params, vec![format!("from {} ({made})", dir.display())])
            }
            None => {
                let (sub_vocab, _) = frequent_tokens(&train_data, args.sub_vocab, target.config().vocab_size);
                let params = HeadParams::init(&target, sub_vocab, args.seed, DType::F32, args.kind, args.layers)?;
                (params, Vec::new())
            }
        };
        let state = CheckpointState {
            kind: args.kind.as_str().to_string(),
            layers: params.config.num_hidden_layers,
            records: records.len(),
            batch_size: args.batch_size,
            max_len: args.max_len,
            epochs_done: 0,
            curve,
        };
        (params, state)
    };
    let coverage = {
        let sub: std::collections::HashSet<u32> = params.sub_vocab.iter().copied().collect();
        let covered = train_data
            .iter()
            .flat_map(|s| &s.tokens[s.answer_start..])
            .filter(|t| sub.contains(t))
            .count();
        covered as f64 / answer_tokens.max(1) as f64
    };
    eprintln!(
        "{} sequences, {answer_tokens} answer tokens ({all_tokens} with prompts); {} held-out sequences; \
         its {}-token sub-vocabulary covers {:.1}% of the answers",
        train_data.len(),
        held_data.len(),
        params.sub_vocab.len(),
        100.0 * coverage
    );
    if !held_data.is_empty() && state.epochs_done == 0 {
        eprintln!(
            "before training: {}",
            held_out_line(&evaluate(&target, &params, &held_data, &cfg)?)
        );
    }
    let cfg = TrainConfig {
        start_epoch: state.epochs_done,
        ..cfg
    };
    let batches = train_data.len().div_ceil(cfg.batch_size.max(1));
    let progress = bar(batches * cfg.epochs.saturating_sub(cfg.start_epoch), "training");
    let train_start = Instant::now();
    let mut recent: Vec<(f64, f64)> = Vec::new();
    train(
        &target,
        &mut params,
        &train_data,
        &cfg,
        |_, _, s| {
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
        },
        |epoch, params, e| {
            let mut line = format!(
                "epoch {epoch}: loss {:.4} (feature {:.4}, token {:.3}), top-1 {:.3}",
                e.loss, e.feature_loss, e.token_loss, e.top1
            );
            if !held_data.is_empty() {
                line += &format!("; {}", held_out_line(&evaluate(&target, params, &held_data, &cfg)?));
            }
            line += &format!(
                " ({:.0} training tok/s)",
                all_tokens as f64 * (epoch - cfg.start_epoch) as f64 / train_start.elapsed().as_secs_f64()
            );
            eprintln!("{line}");
            state.curve.push(line);
            state.epochs_done = epoch;
            save_checkpoint(&args.checkpoint, params, &state)
                .map_err(|e| heterospec_engine::EngineError::Config(format!("checkpoint: {e:#}")))
        },
    )?;
    progress.finish();
    let train_secs = train_start.elapsed().as_secs_f64();
    let mut weights = params.weights()?;
    weights.config.provenance = format!(
        "heterospec train-draft --kind {}{}{}{} --dataset {} --sub-vocab {} --epochs {} --batch-size {} \
         --learning-rate {} --max-len {} --seed {} ({} records, {} sequences trained on, {answer_tokens} answer tokens, \
         {} held out; data {data_secs:.0} s, training {train_secs:.0} s{}; {})",
        args.kind.as_str(),
        match state.layers {
            1 => String::new(),
            n => format!(" --layers {n}"),
        },
        match args.kind {
            HeadKind::Eagle => String::new(),
            HeadKind::Eagle3 => format!(" --ttt-steps {}", args.ttt_steps),
        },
        match &args.init {
            Some(dir) => format!(" --init {}", dir.display()),
            None => String::new(),
        },
        args.dataset.display(),
        params.sub_vocab.len(),
        args.epochs,
        args.batch_size,
        args.learning_rate,
        args.max_len,
        args.seed,
        records.len(),
        train_data.len(),
        held_data.len(),
        if args.resume { ", resumed" } else { "" },
        state.curve.join("; ")
    );
    weights.save(&args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
