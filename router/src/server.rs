//! The router process: the public `heterospec.v1.Generation` service
//! (`crate::service`), the standard health service and reflection on one
//! port, the OpenAI-compatible HTTP front (`crate::openai`) on another when
//! asked, engine discovery and the drain.
//!
//! Shutdown (the `shutdown` future resolves, e.g. on SIGTERM): health turns
//! `NOT_SERVING`, new requests get `UNAVAILABLE`, in-flight streams finish
//! (bounded by the drain timeout), every engine gets its KV lease back
//! (`Detach`), then the server stops.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use heterospec_proto::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::ServingStatus;

use crate::discovery::{reconcile, EngineDiscovery};
use crate::error::RouterError;
use crate::limits::{RequestLimits, TokenizerPool};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::security::{AuthTokens, TlsFiles};
use crate::service::{RouterService, State};
use crate::tokenizer::TextTokenizer;
use crate::validate::ModelLimits;

/// Most requests in flight one router admits (the drain acquires every
/// permit of the in-flight semaphore in one call, which takes a `u32`).
const MAX_CONCURRENT_REQUESTS: usize = 1 << 20;
/// How long clients get to close their connections after the drain.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How often health status follows engine availability.
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Engine URLs, e.g. `http://127.0.0.1:50061`.
    pub engines: Vec<String>,
    /// Engines found (and followed) by DNS, in addition to `engines`.
    pub discovery: Option<EngineDiscovery>,
    pub model_name: String,
    pub max_concurrent_requests: usize,
    pub scheduler: SchedulerConfig,
    pub drain_timeout: Duration,
    pub limits: RequestLimits,
    /// Prompt plus output tokens per request, below the model's context.
    pub max_total_tokens: Option<usize>,
    /// TLS on the public port (optionally requiring client certificates).
    pub tls: Option<TlsFiles>,
    /// TLS to the engines (their URLs then start with https://).
    pub engine_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Bearer tokens `Generate` and `ModelInfo` require; health and
    /// reflection stay open (probes carry no token).
    pub auth: Option<AuthTokens>,
    /// Also serve `grpc.health.v1` alone, in plaintext, here (for probes
    /// that cannot speak TLS).
    pub health_listen: Option<std::net::SocketAddr>,
}

/// Where the router listens.
pub struct Listeners {
    pub grpc: TcpListener,
    /// The OpenAI-compatible HTTP API (`crate::openai`), plaintext.
    pub http: Option<TcpListener>,
}

impl RouterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.engines.is_empty() && self.discovery.is_none() {
            return Err("at least one --engine URL or an --engine-dns name is required".into());
        }
        if self.max_concurrent_requests == 0 {
            return Err("--max-concurrent-requests must be at least 1".into());
        }
        // One semaphore permit per request; the drain takes them all at once.
        if self.max_concurrent_requests > MAX_CONCURRENT_REQUESTS {
            return Err(format!(
                "--max-concurrent-requests must be at most {MAX_CONCURRENT_REQUESTS}"
            ));
        }
        if self.scheduler.max_batch_tokens == 0 {
            return Err("--max-batch-tokens must be at least 1".into());
        }
        if self.scheduler.max_running == 0 {
            return Err("--max-running must be at least 1".into());
        }
        if self.engine_tls.is_some() {
            if let Some(url) = self.engines.iter().find(|u| !u.starts_with("https://")) {
                return Err(format!(
                    "engine URL {url} is not https:// but --engine-tls-ca asks for TLS to engines"
                ));
            }
        }
        if self.max_total_tokens.is_some_and(|n| n < 2) {
            return Err("--max-total-tokens must be at least 2".into());
        }
        self.limits.validate()
    }
}

/// Runs the router on `listener` until `shutdown` resolves and in-flight
/// requests drain.
pub async fn serve(
    config: RouterConfig,
    tokenizer: TextTokenizer,
    max_context: usize,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = listeners.grpc;
    config.validate()?;
    crate::metrics::describe();
    let tokenizer = Arc::new(tokenizer);
    let limits = ModelLimits::new(max_context, tokenizer.vocab_size(), config.max_total_tokens);
    let (retries, mut retried) = mpsc::unbounded_channel();
    let engines = config
        .engines
        .iter()
        .enumerate()
        .map(|(i, url)| {
            Scheduler::spawn(
                i,
                url.clone(),
                config.scheduler,
                tokenizer.clone(),
                retries.clone(),
                config.engine_tls.clone(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let num_static = engines.len();
    let state = Arc::new(State {
        tokenizer,
        limits,
        request_limits: config.limits,
        tokenizing: TokenizerPool::new(&config.limits),
        engines: RwLock::new(engines),
        active: Arc::new(Semaphore::new(config.max_concurrent_requests)),
        max_concurrent: config.max_concurrent_requests,
        draining: AtomicBool::new(false),
        model_name: config.model_name.clone(),
        next_request_id: AtomicUsize::new(1),
        retries,
        engine_tls: config.engine_tls.clone(),
    });
    let retry_state = state.clone();
    tokio::spawn(async move {
        while let Some(retry) = retried.recv().await {
            retry_state.retry(retry);
        }
    });

    if let Some(discovery) = config.discovery.clone() {
        tokio::spawn(follow_dns(discovery, state.clone(), num_static, config.scheduler));
    }

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    // For liveness probes: the process answers, whatever its engines do.
    reporter.set_service_status("liveness", ServingStatus::Serving).await;
    reporter.set_not_serving::<GenerationServer<RouterService>>().await;
    let health_state = state.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let serving = !health_state.draining.load(Ordering::Acquire) && health_state.any_engine_healthy();
            if last != Some(serving) {
                let status = if serving {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                reporter
                    .set_service_status(
                        <GenerationServer<RouterService> as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
                tracing::info!(serving, "health status");
                last = Some(serving);
            }
            tokio::time::sleep(HEALTH_INTERVAL).await;
        }
    });

    if let Some(addr) = config.health_listen {
        serve_health_only(addr, health_service.clone()).await?;
    }

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(heterospec_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    // Drain: on the shutdown signal stop admitting, wait for in-flight
    // requests (bounded), then stop the server.
    let drain_state = state.clone();
    let drain_timeout = config.drain_timeout;
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let (http_stop_tx, http_stop_rx) = tokio::sync::watch::channel(false);
    let stop = async move {
        shutdown.await;
        drain_state.draining.store(true, Ordering::Release);
        tracing::info!("shutting down: draining in-flight requests");
        // Every permit back means every request has ended.
        let all = drain_state.max_concurrent as u32;
        // The permits stay taken: nothing is admitted from here on.
        let _drained = tokio::time::timeout(drain_timeout, drain_state.active.acquire_many(all)).await;
        // Give every KV lease back (all engines at once, each bounded), so
        // a router started next serves at once.
        let engines = drain_state.engines().clone();
        let detaching: Vec<_> = engines
            .into_iter()
            .map(|engine| tokio::spawn(async move { engine.detach().await }))
            .collect();
        for d in detaching {
            let _ = d.await;
        }
        // Let the last responses leave before connections close.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = http_stop_tx.send(true);
        let _ = drained_tx.send(());
    };

    let service = RouterService { state };
    // The HTTP front stops with the drain: it accepts nothing more and its
    // open connections finish.
    let http = listeners.http.map(|listener| {
        let (service, auth, max_body) = (service.clone(), config.auth.clone(), config.limits.max_request_bytes);
        let mut stop = http_stop_rx.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|&s| s).await;
            };
            if let Err(e) = crate::openai::serve_http(listener, service, auth, max_body, stopped).await {
                tracing::error!(error = %e, "the OpenAI-compatible HTTP front stopped");
            }
        })
    });
    let generation = GenerationServer::new(service).max_decoding_message_size(config.limits.max_request_bytes);
    let auth = config.auth.clone();
    let generation = tonic::service::interceptor::InterceptedService::new(generation, move |request| match &auth {
        Some(tokens) => tokens.check(request).inspect_err(|_| {
            metrics::counter!(crate::metrics::REQUESTS_TOTAL, "outcome" => RouterError::Unauthenticated.error_type())
                .increment(1);
        }),
        None => Ok(request),
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.server_config()?)?;
    }
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(generation)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop,
        );
    // The server waits for clients to close their connections; after the
    // drain, give them CLOSE_GRACE and then stop regardless.
    tokio::select! {
        result = server => result?,
        _ = async {
            if drained_rx.await.is_ok() {
                tokio::time::sleep(CLOSE_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::warn!("connections still open after the drain; closing them"),
    }
    if let Some(http) = http {
        if tokio::time::timeout(CLOSE_GRACE, http).await.is_err() {
            tracing::warn!("HTTP connections still open after the drain; closing them");
        }
    }
    Ok(())
}

/// Serves `health` (a `grpc.health.v1` service) alone, in plaintext, on
/// `addr` until the process ends: the port Kubernetes' gRPC probes use when
/// the main port takes TLS.
pub async fn serve_health_only<T: Health>(addr: std::net::SocketAddr, health: HealthServer<T>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Ok(())
}

/// Re-resolves the discovery name every interval: new addresses get a
/// scheduler; vanished ones are retired (no new requests) and dropped once
/// their requests are done. A failed lookup changes nothing.
async fn follow_dns(discovery: EngineDiscovery, state: Arc<State>, mut next_index: usize, config: SchedulerConfig) {
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        match discovery.lookup().await {
            Ok(resolved) => {
                // Engines behind TLS are reached at https:// URLs.
                let resolved: BTreeSet<String> = match state.engine_tls {
                    Some(_) => resolved
                        .into_iter()
                        .map(|u| u.replacen("http://", "https://", 1))
                        .collect(),
                    None => resolved,
                };
                let (add, retire) = reconcile(&known, &resolved);
                let mut engines = state.engines.write().unwrap_or_else(|e| e.into_inner());
                for url in add {
                    if let Some(e) = engines.iter().find(|e| e.url == url) {
                        e.shared.retired.store(false, Ordering::Release);
                    } else {
                        match Scheduler::spawn(
                            next_index,
                            url.clone(),
                            config,
                            state.tokenizer.clone(),
                            state.retries.clone(),
                            state.engine_tls.clone(),
                        ) {
                            Ok(handle) => {
                                next_index += 1;
                                engines.push(handle);
                            }
                            Err(e) => {
                                tracing::warn!(%url, error = %e, "cannot use a discovered engine");
                                continue;
                            }
                        }
                    }
                    tracing::info!(%url, "engine discovered");
                    known.insert(url);
                }
                for url in retire {
                    if let Some(e) = engines.iter().find(|e| e.url == url) {
                        e.shared.retired.store(true, Ordering::Release);
                    }
                    tracing::info!(%url, "engine gone from discovery: retiring it");
                    known.remove(&url);
                }
                // Retired engines leave once their requests are done.
                engines.retain(|e| {
                    !(e.shared.retired.load(Ordering::Acquire) && e.shared.load.load(Ordering::Acquire) == 0)
                });
            }
            Err(e) => tracing::warn!(host = %discovery.host, error = %e, "engine discovery lookup failed"),
        }
        tokio::time::sleep(discovery.interval).await;
    }
}
