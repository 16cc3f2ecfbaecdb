//! `voice-operator`: parse flags, set up logs, wire, run. Nothing else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use voice_operator::autoscale::poller::PollerConfig;
use voice_operator::context::Config;
use voice_operator::controller;
use voice_operator::leader::{LeaderConfig, Timings, run_when_leader};
use voice_operator::metrics::Metrics;
use voice_operator::web::{WebState, app};
use voice_operator::{crdgen, render};

#[derive(Parser)]
#[command(
    name = "voice-operator",
    version,
    about = "callmeback Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile Personas and VoiceDeployments.
    Run(Box<RunArgs>),
    /// Write the CRDs (persona.yaml, voicedeployment.yaml) into a directory.
    Crdgen {
        /// Output directory.
        #[arg(long, default_value = "crds")]
        out: PathBuf,
        /// Print to stdout instead of writing files.
        #[arg(long)]
        stdout: bool,
    },
    /// Print the objects the operator would apply for these files, offline.
    Render {
        /// Persona / VoiceDeployment YAML files (repeatable).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Health, readiness and metrics listener.
    #[arg(long, env = "OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Twilio REST base for pointing numbers at voice pods (emulators, a proxy). Only
    /// the operator chooses it: a tenant Secret's TWILIO_API_URL is for the pods.
    #[arg(long, env = "TWILIO_API_URL", default_value = voice_operator::twilio_numbers::DEFAULT_TWILIO_API_URL)]
    twilio_api_url: String,
    /// Seconds deletion keeps retrying to restore Twilio numbers before giving up.
    #[arg(
        long,
        env = "OPERATOR_TWILIO_RESTORE_DEADLINE_SECONDS",
        default_value_t = 120
    )]
    twilio_restore_deadline_seconds: u64,
    /// Seconds between checks of wired numbers against Twilio, stretched per
    /// deployment to 0.75x..1.25x; spec and Secret changes are wired at once.
    #[arg(
        long,
        env = "OPERATOR_TWILIO_VERIFY_INTERVAL_SECONDS",
        default_value_t = 3600
    )]
    twilio_verify_interval_seconds: u64,
    /// Seconds between periodic reconciles of each VoiceDeployment.
    #[arg(long, env = "OPERATOR_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Concurrent reconciles per kind.
    #[arg(long, env = "OPERATOR_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Run controllers only while holding the Lease (`false` only for a single
    /// operator run by hand, e.g. against a cluster where it cannot write Leases).
    #[arg(long, env = "OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Lease name.
    #[arg(
        long,
        env = "OPERATOR_LEASE_NAME",
        default_value = "callmeback-operator"
    )]
    lease_name: String,
    /// Lease namespace (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity (pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds between reads of every voice pod's load (`GET /load`).
    #[arg(long, env = "OPERATOR_LOAD_POLL_INTERVAL_SECONDS", default_value_t = 5)]
    load_poll_interval: u64,
    /// The voice pods' port serving `/load` (their metrics port).
    #[arg(long, env = "OPERATOR_LOAD_PORT", default_value_t = 9090)]
    load_port: u16,
    /// Concurrent `/load` requests.
    #[arg(long, env = "OPERATOR_LOAD_CONCURRENCY", default_value_t = 32)]
    load_concurrency: usize,
    /// Average pod annotation patches per second (deletion cost, eviction guards).
    #[arg(long, env = "OPERATOR_POD_PATCHES_PER_SECOND", default_value_t = 20)]
    pod_patches_per_second: u32,
    /// Log format: json or text.
    #[arg(long, env = "OPERATOR_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "text" {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crdgen { out, stdout } => {
            if stdout {
                for (_, content) in crdgen::files()? {
                    print!("---\n{content}");
                }
            } else {
                crdgen::write(&out).with_context(|| format!("writing {}", out.display()))?;
            }
            Ok(())
        }
        Command::Render { files } => {
            let mut inputs = Vec::new();
            for f in files {
                let content = std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?;
                inputs.push((f.display().to_string(), content));
            }
            print!("{}", render::render(&inputs)?);
            Ok(())
        }
        Command::Run(args) => run(*args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logs(&args.log_format);
    let twilio_api_url = voice_operator::twilio_numbers::validate_api_base(&args.twilio_api_url)
        .context("--twilio-api-url / TWILIO_API_URL")?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes")?;
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let web = app(WebState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    });
    let web_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, web)
            .with_graceful_shutdown(web_shutdown.cancelled_owned())
            .await
    });

    let signals = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        signals.cancel();
    });

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("voice-operator-{}", std::process::id()));
    let config = Config {
        twilio_api_url,
        twilio_restore_deadline: Duration::from_secs(args.twilio_restore_deadline_seconds),
        twilio_verify_interval: Duration::from_secs(args.twilio_verify_interval_seconds.max(1)),
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        namespace: args.watch_namespace,
        concurrency: args.concurrency,
        instance: Some(identity.clone()),
        poller: PollerConfig {
            interval: Duration::from_secs(args.load_poll_interval.max(1)),
            port: args.load_port,
            concurrency: args.load_concurrency.max(1),
            max_patches_per_second: args.pod_patches_per_second.max(1),
            ..PollerConfig::default()
        },
    };
    ready.store(true, Ordering::Relaxed);
    if args.leader_election {
        let leader = LeaderConfig {
            lease_name: args.lease_name,
            namespace: args.lease_namespace,
            identity,
            timings: Timings::default(),
        };
        let (c, m) = (client.clone(), metrics.clone());
        // A lost Lease ends the process (non-zero): it restarts and campaigns
        // afresh instead of acting on state from while it was cut off.
        run_when_leader(client, leader, metrics, shutdown.clone(), move |term| {
            controller::run(c, config, m, term)
        })
        .await?;
    } else {
        metrics.leader.set(1);
        controller::run(client, config, metrics, shutdown.clone()).await;
    }
    shutdown.cancel();
    // Bounded: a stuck connection must not keep the pod from exiting.
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
