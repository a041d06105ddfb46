//! The OpenAI-compatible HTTP front (`--http-listen`): `POST
//! /v1/chat/completions` and `POST /v1/completions` (whole replies, or
//! server-sent events with `stream`), `GET /v1/models`, `GET /health`.
//!
//! Invariants: an HTTP request is a `Generate` call on the same
//! `RouterService` the gRPC port serves, so validation, limits, bearer
//! tokens, metrics and scheduling are the same; every error is OpenAI's
//! JSON error with the HTTP code of its gRPC status (`error::http_status`);
//! a client that goes away drops the response stream, which cancels the
//! request and frees its KV blocks.

mod reply;
mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use heterospec_proto::v1::generation_server::Generation;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Status;

use crate::error::{http_status, RouterError};
use crate::security::AuthTokens;
use crate::service::RouterService;

pub use reply::{Kind, Reply};
pub use wire::{ChatRequest, Common, CompletionRequest, ReplyOptions};

type GenerateStream = ReceiverStream<Result<heterospec_proto::v1::GenerateResponse, Status>>;

struct Front {
    service: RouterService,
    auth: Option<AuthTokens>,
    started: u64,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Serves the OpenAI-compatible API on `listener` until `shutdown`
/// resolves and open connections finish (a draining router answers 503,
/// as its gRPC port answers UNAVAILABLE).
pub async fn serve_http(
    listener: TcpListener,
    service: RouterService,
    auth: Option<AuthTokens>,
    max_body_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let front = Arc::new(Front {
        service,
        auth,
        started: now_secs(),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async { error_response(404, "not_found_error", "not_found", "no such endpoint", None) })
        .method_not_allowed_fallback(|| async {
            error_response(
                405,
                "invalid_request_error",
                "method_not_allowed",
                "method not allowed",
                None,
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(front);
    // Token chunks leave at once (as on the gRPC port).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
fn error_body(kind: &str, code: &str, message: &str, param: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

fn error_response(status: u16, kind: &str, code: &str, message: &str, param: Option<&str>) -> Response {
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &error_body(kind, code, message, param),
    )
}

/// The error object of a gRPC status (`code`: the status code's name) and
/// its HTTP code.
fn status_error(status: &Status) -> (u16, Value) {
    let (http, kind) = http_status(status.code());
    // Validation messages read "invalid <field>: <reason>".
    let param = status
        .message()
        .strip_prefix("invalid ")
        .and_then(|m| m.split_once(':'))
        .map(|(f, _)| match f {
            "max_new_tokens" => "max_tokens",
            f => f,
        });
    let code = format!("{:?}", status.code());
    let code: String = code
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let lower = c.to_ascii_lowercase();
            (c.is_ascii_uppercase() && i > 0)
                .then_some('_')
                .into_iter()
                .chain([lower])
        })
        .collect();
    (http, error_body(kind, &code, status.message(), param))
}

fn error_from_status(status: &Status) -> Response {
    let (http, body) = status_error(status);
    json_response(
        StatusCode::from_u16(http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// A refusal made here (before `Generate`) counts like one made there.
fn refuse(e: RouterError) -> Response {
    metrics::counter!(crate::metrics::REQUESTS_TOTAL, "outcome" => e.error_type()).increment(1);
    error_from_status(&e.into())
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, RouterError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        RouterError::InvalidArgument {
            field: "body",
            reason: if path == "." {
                e.into_inner().to_string()
            } else {
                format!("{path}: {}", e.into_inner())
            },
        }
    })
}

impl Front {
    /// The same bearer-token check as the gRPC port's.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Status> {
        let Some(tokens) = &self.auth else { return Ok(()) };
        let mut request = tonic::Request::new(());
        if let Some(v) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| tonic::metadata::MetadataValue::try_from(v).ok())
        {
            request.metadata_mut().insert("authorization", v);
        }
        tokens.check(request).map(|_| ()).inspect_err(|_| {
            metrics::counter!(crate::metrics::REQUESTS_TOTAL, "outcome" => RouterError::Unauthenticated.error_type())
                .increment(1);
        })
    }

    async fn complete(&self, kind: Kind, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
        if let Err(status) = self.authorize(&headers) {
            return error_from_status(&status);
        }
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                let message = format!("{} (the limit is --max-request-bytes)", e.body_text());
                return error_response(
                    e.status().as_u16(),
                    "invalid_request_error",
                    "body",
                    &message,
                    Some("body"),
                );
            }
        };
        let model = self.service.model_name().to_string();
        let parsed = parse::<Common>(&body).and_then(|common| match kind {
            Kind::Chat => parse::<ChatRequest>(&body).and_then(|r| r.into_generate(common, &model)),
            Kind::Completion => parse::<CompletionRequest>(&body).and_then(|r| r.into_generate(common, &model)),
        });
        let (mut request, options) = match parsed {
            Ok(p) => p,
            Err(e) => return refuse(e),
        };
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        let id = format!("{prefix}-{:016x}", rand::random::<u64>());
        request.request_id = id.clone();
        let stream = match self.service.generate(tonic::Request::new(request)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return error_from_status(&status),
        };
        let reply = Reply {
            kind,
            id,
            model,
            created: now_secs(),
            options,
        };
        if options.stream {
            self.stream(reply, stream)
        } else {
            self.whole(reply, stream).await
        }
    }

    async fn whole(
        &self,
        reply: Reply,
        mut stream: ReceiverStream<Result<heterospec_proto::v1::GenerateResponse, Status>>,
    ) -> Response {
        let mut responses = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(r) => responses.push(r),
                Err(status) => return error_from_status(&status),
            }
        }
        json_response(StatusCode::OK, &reply.whole(self.service.tokenizer(), &responses))
    }

    /// Server-sent events: a chunk per response, then `[DONE]`; an error
    /// after the first chunk is one `{"error": ...}` event before `[DONE]`.
    /// A client that goes away, even before the first token, drops
    /// `stream`, which cancels the request.
    fn stream(&self, reply: Reply, mut stream: GenerateStream) -> Response {
        let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(16);
        let tokenizer = self.service.tokenizer().clone();
        tokio::spawn(async move {
            let event = |v: &Value| Ok(Event::default().data(v.to_string()));
            if let Some(first) = reply.role_chunk() {
                if tx.send(event(&first)).await.is_err() {
                    return;
                }
            }
            let mut offset = 0;
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return,
                    item = stream.next() => item,
                };
                let Some(item) = item else { break };
                let chunks = match item {
                    Ok(r) => reply.chunks(&tokenizer, &r, &mut offset),
                    Err(status) => vec![status_error(&status).1],
                };
                for c in &chunks {
                    if tx.send(event(c)).await.is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        });
        Sse::new(ReceiverStream::new(rx))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response()
    }
}

async fn chat(State(front): State<Arc<Front>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    front.complete(Kind::Chat, headers, body).await
}

async fn completions(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    front.complete(Kind::Completion, headers, body).await
}

async fn models(State(front): State<Arc<Front>>, headers: HeaderMap) -> Response {
    if let Err(status) = front.authorize(&headers) {
        return error_from_status(&status);
    }
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [{
            "id": front.service.model_name(),
            "object": "model",
            "created": front.started,
            "owned_by": "heterospec",
            "max_model_len": front.service.max_context(),
        }]}),
    )
}

/// 200 while the router serves (an engine is healthy and it is not
/// draining), else 503: for HTTP readiness probes.
async fn health(State(front): State<Arc<Front>>) -> Response {
    if front.service.serving() {
        StatusCode::OK.into_response()
    } else {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    }
}
