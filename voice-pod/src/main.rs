//! `voice-pod`: parse flags, set up JSON logs, wire, run. Everything else lives in
//! the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use voice_pod::config::{Config, EXIT_BAD_CONFIG, ServeArgs};
use voice_pod::drain::{self, DrainOutcome};
use voice_pod::engine::Engine;
use voice_pod::http::{self, Pod};

#[derive(Parser)]
#[command(
    name = "voice-pod",
    version,
    about = "callmeback voice pod: Twilio calls to AI personas"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Twilio webhooks, media streams and the call-me-back API.
    Serve(ServeArgs),
}

/// How long records still queued at exit get to reach the database.
const STORE_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            // Help and version are not errors; anything else is a usage error.
            return if err.use_stderr() {
                ExitCode::from(EXIT_BAD_CONFIG as u8)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging();
    match cli.command {
        Command::Serve(args) => {
            let config = match Config::from_args(args) {
                Ok(c) => c,
                Err(err) => {
                    tracing::error!(error = %err, "bad configuration");
                    eprintln!("voice-pod: {err}");
                    return ExitCode::from(EXIT_BAD_CONFIG as u8);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    eprintln!("voice-pod: cannot start the runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = format!("{err:#}"), "voice pod failed");
                    eprintln!("voice-pod: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(true)
        .with_writer(std::io::stderr)
        .init();
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let app = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (CALLMEBACK_LISTEN)", config.listen))?;
    let metrics = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (CALLMEBACK_METRICS_LISTEN)",
                config.metrics_listen
            )
        })?;
    let shutdown = async {
        let signal = drain::shutdown_signal().await;
        tracing::info!(?signal, "shutdown signal received");
        // A second signal means "now": exit without waiting for calls.
        tokio::spawn(async {
            let again = drain::shutdown_signal().await;
            tracing::warn!(signal = ?again, "second signal: exiting without finishing calls");
            std::process::exit(130);
        });
    };
    let database_url = config.database_url.clone();
    let mut pod = Pod::new(config);
    // Call records, scheduled callbacks and the scheduler need PostgreSQL.
    let store = voice_pod::store::postgres::open(
        database_url.as_ref().map(|s| s.expose()),
        |_| {},
        &pod.metrics,
    )
    .await
    .context("DATABASE_URL")?;
    if let Some(store) = &store {
        pod = pod.with_store(store.clone());
    }
    // The conversation engine answers calls once provider keys are configured.
    match Engine::from_lookup(|k| std::env::var(k).ok(), pod.metrics.clone())
        .context("provider configuration")?
    {
        Some(engine) => {
            // Each persona's greeting is synthesized before the first call rings.
            let (dir, routes) = (
                pod.config.persona_dir.clone(),
                pod.config.routes_file.clone(),
            );
            tokio::spawn(engine.clone().warm_persona_dir(dir, routes));
            pod = pod.with_handler(std::sync::Arc::new(engine));
        }
        None => tracing::warn!(
            "no provider keys (DEEPGRAM_API_KEY, CEREBRAS_API_KEY, ELEVENLABS_API_KEY): calls are answered in silence"
        ),
    }
    let outcome = http::serve(pod, app, metrics, shutdown).await?;
    if let Some(store) = store {
        store.shutdown(STORE_SHUTDOWN_GRACE).await;
    }
    match outcome {
        DrainOutcome::Finished => tracing::info!("all calls finished; exiting"),
        DrainOutcome::DeadlineCancelled => {
            tracing::warn!("drain deadline passed; remaining calls were ended")
        }
    }
    Ok(())
}
