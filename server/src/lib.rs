//! An OpenAI-compatible HTTP server for candle-moe models: the engine runs
//! on its own thread (continuous batching, see `candle_moe_models::engine`),
//! axum serves `/v1/completions`, `/v1/chat/completions`, `/v1/models`,
//! `/health` and `/metrics` on tokio.

pub mod chat_template;
pub mod protocol;
pub mod routes;
pub mod worker;

pub use chat_template::ChatTemplate;
pub use routes::{router, AppState};
pub use worker::{channel, EngineHandle, Worker};

/// Default request-body limit (413 above).
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// Serves `app` on `listener` until `shutdown` resolves, then lets the open
/// requests finish (graceful drain).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
