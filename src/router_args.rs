//! The router's flags, shared by `heterospec router` and `heterospec
//! serve` (which passes them on to the router it starts).
//!
//! Invariant: `to_cli_args` gives back every flag set here, so a router
//! started by `serve` runs with the settings `serve` was given.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use heterospec_router::limits::RequestLimits;
use heterospec_router::scheduler::OverlapSteps;
use heterospec_router::security::{AuthTokens, TlsFiles};

#[derive(Debug, Clone, Args)]
pub struct RouterArgs {
    /// A Jinja chat template to use instead of the model's own (or of its
    /// family's, for a GGUF without one).
    #[arg(long, env = "HETEROSPEC_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Requests in flight (running or queued) beyond which new ones are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "HETEROSPEC_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// Tokens per engine step (prompt chunks plus decode tokens).
    #[arg(long, env = "HETEROSPEC_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Sequences per engine step.
    #[arg(long, env = "HETEROSPEC_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "HETEROSPEC_DRAIN_TIMEOUT", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Seconds one engine step may take before the engine counts as failed.
    #[arg(long, default_value_t = 120)]
    pub step_timeout_secs: u64,
    /// Send the next step of steady decoding while one runs: auto (for GPU
    /// engines, not CPU ones), on or off.
    #[arg(long, env = "HETEROSPEC_OVERLAP_STEPS", default_value_t = OverlapSteps::Auto)]
    pub overlap_steps: OverlapSteps,
    /// Largest prompt in bytes (`prompt`, or all chat messages together),
    /// refused before tokenizing.
    #[arg(long, env = "HETEROSPEC_MAX_PROMPT_BYTES", default_value_t = 1 << 20)]
    pub max_prompt_bytes: usize,
    /// Most chat messages per request.
    #[arg(long, env = "HETEROSPEC_MAX_MESSAGES", default_value_t = 256)]
    pub max_messages: usize,
    /// Largest encoded request in bytes (refused by the gRPC server before
    /// it is read).
    #[arg(long, env = "HETEROSPEC_MAX_REQUEST_BYTES", default_value_t = 4 << 20)]
    pub max_request_bytes: usize,
    /// Prompt bytes being tokenized at once, all requests together; beyond
    /// it new requests are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "HETEROSPEC_MAX_INFLIGHT_PROMPT_BYTES", default_value_t = 64 << 20)]
    pub max_inflight_prompt_bytes: usize,
    /// Threads tokenizing prompts at once (off the request threads).
    #[arg(long, env = "HETEROSPEC_TOKENIZER_THREADS", default_value_t = 2)]
    pub tokenizer_threads: usize,
    /// Prompt plus output tokens per request (default: the model's context).
    #[arg(long, env = "HETEROSPEC_MAX_TOTAL_TOKENS")]
    pub max_total_tokens: Option<usize>,
    /// TLS certificate (PEM) of the public port; with --tls-key.
    #[arg(long, env = "HETEROSPEC_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the public port.
    #[arg(long, env = "HETEROSPEC_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) client certificates must chain to: mutual TLS on the
    /// public port.
    #[arg(long, env = "HETEROSPEC_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Bearer tokens Generate and ModelInfo require, one per line
    /// (`authorization: Bearer <token>`); health and reflection stay open.
    #[arg(long, env = "HETEROSPEC_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address (for
    /// Kubernetes' gRPC probes when the public port takes TLS).
    #[arg(long, env = "HETEROSPEC_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Also serve the OpenAI-compatible HTTP API here (plaintext):
    /// `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`.
    #[arg(long, env = "HETEROSPEC_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
}

impl RouterArgs {
    /// The same settings as `router` flags (for the processes `serve` starts).
    pub fn to_cli_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            ("--max-concurrent-requests", self.max_concurrent_requests.to_string()),
            ("--max-batch-tokens", self.max_batch_tokens.to_string()),
            ("--max-running", self.max_running.to_string()),
            ("--drain-timeout-secs", self.drain_timeout_secs.to_string()),
            ("--step-timeout-secs", self.step_timeout_secs.to_string()),
            ("--overlap-steps", self.overlap_steps.to_string()),
            ("--max-prompt-bytes", self.max_prompt_bytes.to_string()),
            ("--max-messages", self.max_messages.to_string()),
            ("--max-request-bytes", self.max_request_bytes.to_string()),
            (
                "--max-inflight-prompt-bytes",
                self.max_inflight_prompt_bytes.to_string(),
            ),
            ("--tokenizer-threads", self.tokenizer_threads.to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect();
        if let Some(n) = self.max_total_tokens {
            args.extend(["--max-total-tokens".to_string(), n.to_string()]);
        }
        if let Some(addr) = self.health_listen {
            args.extend(["--health-listen".to_string(), addr.to_string()]);
        }
        if let Some(addr) = self.http_listen {
            args.extend(["--http-listen".to_string(), addr.to_string()]);
        }
        for (flag, path) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-client-ca", &self.tls_client_ca),
            ("--auth-tokens-file", &self.auth_tokens_file),
            ("--chat-template", &self.chat_template),
        ] {
            if let Some(path) = path {
                args.extend([flag.to_string(), path.display().to_string()]);
            }
        }
        args
    }

    /// TLS of the public port and the bearer tokens, from the flags.
    pub fn security(&self) -> Result<(Option<TlsFiles>, Option<AuthTokens>)> {
        let tls = TlsFiles::from_flags(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_client_ca.clone(),
            "",
        )
        .map_err(anyhow::Error::msg)?;
        let auth = self
            .auth_tokens_file
            .as_deref()
            .map(AuthTokens::from_file)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        Ok((tls, auth))
    }

    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            max_prompt_bytes: self.max_prompt_bytes,
            max_messages: self.max_messages,
            max_request_bytes: self.max_request_bytes,
            max_inflight_prompt_bytes: self.max_inflight_prompt_bytes,
            tokenizer_threads: self.tokenizer_threads,
        }
    }
}
