//! `voice-pod`: parse flags, set up JSON logs, wire, run. Everything else lives in
//! the library.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use voice_pod::config::{Config, EXIT_BAD_CONFIG, ServeArgs, pod_name};
use voice_pod::drain::{self, DrainOutcome};
use voice_pod::engine::Engine;
use voice_pod::metrics::Metrics;
use voice_pod::pod::{self, Pod};
use voice_pod::store::StoreHealth;
use voice_pod::store::journal::StoreJournal;
use voice_pod::store::pricing::{PRICES_FILE_ENV, PriceTable};

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
    Serve(Box<ServeArgs>),
    /// Per-user API tokens: a user token places calls only to its user's registered
    /// numbers and reads only its user's calls (kept in PostgreSQL as digests).
    #[command(subcommand)]
    UserToken(UserTokenCommand),
}

#[derive(Subcommand)]
enum UserTokenCommand {
    /// Registers numbers for a user and prints a new token for them (shown once).
    Issue {
        #[command(flatten)]
        db: DatabaseArg,
        /// The user (the `user` of their calls).
        #[arg(long)]
        user: String,
        /// A number (E.164) the user may be called back on; repeat for more.
        #[arg(long = "number")]
        numbers: Vec<String>,
    },
    /// Revokes every token of a user.
    Revoke {
        #[command(flatten)]
        db: DatabaseArg,
        /// The user.
        #[arg(long)]
        user: String,
    },
    /// Removes a registered number of a user.
    RemoveNumber {
        #[command(flatten)]
        db: DatabaseArg,
        /// The user.
        #[arg(long)]
        user: String,
        /// The number (E.164).
        #[arg(long)]
        number: String,
    },
}

#[derive(clap::Args)]
struct DatabaseArg {
    /// PostgreSQL URL of the deployment's store.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

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
        Command::UserToken(command) => match run_user_token(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("voice-pod: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => {
            let config = match Config::from_args(*args) {
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

/// `voice-pod user-token ...`: migrates the store (a new deployment may not have
/// run a pod yet), then issues, revokes or unregisters. Only a new token reaches
/// stdout; nothing secret is logged.
fn run_user_token(command: UserTokenCommand) -> anyhow::Result<()> {
    use voice_pod::access;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let url = match &command {
            UserTokenCommand::Issue { db, .. }
            | UserTokenCommand::Revoke { db, .. }
            | UserTokenCommand::RemoveNumber { db, .. } => db.database_url.clone(),
        };
        let pool = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&url),
        )
        .await
        .context("PostgreSQL did not answer within 10 s (DATABASE_URL)")?
        .context("cannot connect to PostgreSQL (DATABASE_URL)")?;
        voice_pod::store::postgres::MIGRATOR
            .run(&pool)
            .await
            .context("migrating the store")?;
        match command {
            UserTokenCommand::Issue { user, numbers, .. } => {
                let numbers: Vec<String> = numbers
                    .iter()
                    .map(|n| {
                        voice_pod::phone::normalize_e164(n)
                            .with_context(|| format!("{n:?} is not an international number"))
                    })
                    .collect::<anyhow::Result<_>>()?;
                let token = access::issue_user_token(&pool, &user, &numbers).await?;
                eprintln!(
                    "issued a token for user {user:?} ({} number(s) registered); it is shown once:",
                    numbers.len()
                );
                println!("{token}");
            }
            UserTokenCommand::Revoke { user, .. } => {
                let n = access::revoke_user_tokens(&pool, &user).await?;
                eprintln!("revoked {n} token(s) of user {user:?}");
            }
            UserTokenCommand::RemoveNumber { user, number, .. } => {
                let number = voice_pod::phone::normalize_e164(&number)
                    .with_context(|| format!("{number:?} is not an international number"))?;
                if access::remove_user_number(&pool, &user, &number).await? {
                    eprintln!("removed the number from user {user:?}");
                } else {
                    anyhow::bail!("user {user:?} had no such number");
                }
            }
        }
        pool.close().await;
        Ok(())
    })
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

/// How long start-up waits for PostgreSQL (migrations) before serving without it; the
/// writer keeps buffering and migrates when the database answers.
const STORE_STARTUP_WAIT: Duration = Duration::from_secs(3);

/// `DATABASE_URL` set: the PostgreSQL store (migrated, writer running; a database
/// that is down only delays start-up by [`STORE_STARTUP_WAIT`]). Unset: `None`, and
/// the store says once that persistence is off.
async fn open_store(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<StoreJournal>> {
    let prices = match std::env::var(PRICES_FILE_ENV)
        .ok()
        .filter(|p| !p.trim().is_empty())
    {
        Some(path) => PriceTable::load(std::path::Path::new(path.trim()))
            .with_context(|| format!("bad price table ({PRICES_FILE_ENV})"))?,
        None => PriceTable::default(),
    };
    let url = config.database_url.as_ref().map(|u| u.expose());
    let store = voice_pod::store::postgres::open(
        url,
        |cfg| {
            cfg.prices = prices;
            cfg.startup_timeout = STORE_STARTUP_WAIT;
        },
        metrics,
    )
    .await
    .context("DATABASE_URL")?;
    if let Some(store) = &store
        && store.health() != StoreHealth::Up
    {
        tracing::warn!(
            "serving without PostgreSQL for now: call records are buffered until it answers"
        );
    }
    Ok(store.map(StoreJournal::new))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let metrics_registry = Arc::new(Metrics::new());
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
    let journal = open_store(&config, &metrics_registry).await?;
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
    let mut pod = Pod::new(config).with_metrics(metrics_registry);
    if let Some(journal) = &journal {
        pod = pod.with_store(journal.store().clone());
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
            let engine = match &journal {
                Some(j) => engine.with_journal(Arc::new(j.clone()), pod_name()),
                None => engine,
            };
            pod = pod.with_handler(Arc::new(engine));
        }
        None => tracing::warn!(
            "no provider keys (DEEPGRAM_API_KEY, CEREBRAS_API_KEY, ELEVENLABS_API_KEY): calls are answered in silence"
        ),
    }
    // Calls are over: memory notes and buffered records get a last chance, each phase
    // within its own deadline, before the metrics server stops. A server that failed
    // does not skip this: records are written or counted either way.
    let finish = async move {
        if let Some(journal) = journal {
            let budget = drain::SHUTDOWN_BUDGET;
            journal
                .close(budget.memory, budget.writer, budget.pool_close)
                .await;
        }
    };
    match pod::serve_until(pod, app, metrics, shutdown, finish).await? {
        DrainOutcome::Finished => tracing::info!("all calls finished; exiting"),
        DrainOutcome::DeadlineCancelled => {
            tracing::warn!("drain deadline passed; remaining calls were ended")
        }
    }
    Ok(())
}
