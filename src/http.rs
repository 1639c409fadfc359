//! HTTP endpoints: `/ready`, `/metrics`, `/query`, `/flush`, `/reload`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Deserialize;
use sluice_storage::Storage;

use crate::output::{self, Format};

/// Reloads the alert rules and webhooks from the configuration; says what is in effect.
pub(crate) type Reload = Arc<dyn Fn() -> anyhow::Result<String> + Send + Sync>;

#[derive(Clone)]
pub(crate) struct AppState {
    pub storage: Storage,
    pub registry: Registry,
    pub ready: Arc<AtomicBool>,
    /// `/ready` is unready while the WAL cannot store appends (a full disk).
    pub wal: Option<sluice_storage::wal::Wal>,
    pub reload: Reload,
    /// `Authorization: Bearer` this, for `/query`, `/flush`, `/reload` (and `/metrics`
    /// with `protect_metrics`).
    pub token: Option<Arc<str>>,
    pub protect_metrics: bool,
}

pub(crate) struct HttpServer {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    stopped: std::sync::mpsc::Receiver<()>,
}

impl HttpServer {
    /// Binds `addr` (port 0 allowed) and serves on `runtime`.
    pub(crate) fn start(
        runtime: &tokio::runtime::Handle,
        addr: SocketAddr,
        state: AppState,
    ) -> std::io::Result<HttpServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let protected = Router::new()
            .route("/query", get(query_get).post(query_post))
            .route("/flush", post(flush))
            .route("/reload", post(reload));
        let (protected, open) = if state.protect_metrics {
            (protected.route("/metrics", get(metrics)), Router::new())
        } else {
            (protected, Router::new().route("/metrics", get(metrics)))
        };
        let app = protected
            .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
            .merge(open.route("/ready", get(ready)))
            .with_state(state);
        let (stop, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, stopped) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped_rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
            let _ = done_tx.send(());
        });
        tracing::info!(%addr, "HTTP ready");
        Ok(HttpServer {
            addr,
            stop,
            stopped,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving; in-flight requests finish first (up to 5 s). Blocks.
    pub(crate) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.stopped.recv_timeout(std::time::Duration::from_secs(5));
    }
}

async fn ready(State(state): State<AppState>) -> Response {
    if !state.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response();
    }
    if state.wal.as_ref().is_some_and(|w| !w.healthy()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the write-ahead log cannot store messages (disk full or failing; see sluice_wal_healthy and the log); publishes are not acknowledged until it can\n",
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Some(wal) = &state.wal {
        wal.healthy();
    }
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct QueryParams {
    sql: Option<String>,
    format: Option<Format>,
}

async fn query_get(State(state): State<AppState>, Query(params): Query<QueryParams>) -> Response {
    match params.sql {
        Some(sql) => run_query(&state, &sql, params.format).await,
        None => error(StatusCode::BAD_REQUEST, "missing the sql parameter".into()),
    }
}

async fn query_post(
    State(state): State<AppState>,
    Query(params): Query<QueryParams>,
    body: Bytes,
) -> Response {
    match std::str::from_utf8(&body) {
        Ok(sql) if !sql.trim().is_empty() => run_query(&state, sql, params.format).await,
        Ok(_) => error(
            StatusCode::BAD_REQUEST,
            "the request body must hold a SQL query".into(),
        ),
        Err(_) => error(StatusCode::BAD_REQUEST, "the SQL query is not UTF-8".into()),
    }
}

async fn run_query(state: &AppState, sql: &str, format: Option<Format>) -> Response {
    let format = format.unwrap_or(Format::Json);
    match state.storage.sql(sql).await {
        Ok(result) => match output::encode(format, &result.schema, &result.batches) {
            Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the result: {e}"),
            ),
        },
        Err(e) if e.is_busy() => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            axum::Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
        // Over a limit of [query] (memory, time, result size): the query as written
        // cannot run here.
        Err(e) if e.is_user_error() || e.is_limit() => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn flush(State(state): State<AppState>) -> Response {
    let storage = state.storage.clone();
    match tokio::task::spawn_blocking(move || storage.flush()).await {
        Ok(Ok(report)) => axum::Json(serde_json::json!({
            "rows": report.rows,
            "files": report.files,
            "bytes": report.bytes,
        }))
        .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn reload(State(state): State<AppState>) -> Response {
    let reload = state.reload.clone();
    match tokio::task::spawn_blocking(move || reload()).await {
        Ok(Ok(summary)) => axum::Json(serde_json::json!({ "reloaded": summary })).into_response(),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Lets a request through if no token is set or it carries the token
/// (`Authorization: Bearer TOKEN`, compared in constant time); 401 otherwise.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim());
    let allowed = given.is_some_and(|given| {
        subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.as_bytes()).into()
    });
    if allowed {
        return next.run(request).await;
    }
    let message = if given.is_some() {
        "the bearer token is wrong"
    } else {
        "this endpoint needs Authorization: Bearer <token> (http.token; sluice sql --token or SLUICE_TOKEN)"
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"sluice\"")],
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}
