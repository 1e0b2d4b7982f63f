//! The `kawka` command line: parse, set up logging, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kawka::config::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "kawka",
    version,
    about = "Keeps Elasticsearch and Postgres read models up to date from Avro event streams in Kafka"
)]
struct Cli {
    /// Log format (overrides `log.format` of the config file).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every connector: consume, decode, upcast, project, write, commit.
    Run {
        /// The daemon config file.
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
    },
    /// Check the daemon config and every connector file, listing every problem
    /// with file and line; exits 2 when there is any.
    Validate {
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
    },
    /// Serve a Confluent-compatible schema registry (Avro) stored in Postgres.
    Registry {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081", env = "KAWKA_REGISTRY_LISTEN")]
        listen: std::net::SocketAddr,
        /// Postgres database that stores the schemas.
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/kawka", env = "KAWKA_REGISTRY_DATABASE_URL")]
        database_url: String,
        /// Postgres schema of the registry's tables (created when missing).
        #[arg(long, env = "KAWKA_REGISTRY_SCHEMA")]
        schema: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kawka: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Validate { config } => validate(&config),
        Command::Run { config } => {
            let settings = match config::load(&config) {
                Ok(settings) => settings,
                Err(problems) => {
                    eprint!("{problems}");
                    return ExitCode::from(2);
                }
            };
            kawka::telemetry::init(cli.log_format.unwrap_or(settings.log.format), &settings.log.level);
            match runtime.block_on(kawka::app::run(settings, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("kawka run: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Registry { listen, database_url, schema } => {
            kawka::telemetry::init(cli.log_format.unwrap_or_default(), "info");
            let settings = kawka::registry::RegistryServerSettings { listen, database_url, schema };
            match runtime.block_on(kawka::registry::serve(&settings, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("kawka registry: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn validate(config: &std::path::Path) -> ExitCode {
    match config::load(config) {
        Ok(settings) => {
            println!("{}: ok, {} connector(s)", config.display(), settings.connectors.len());
            for connector in &settings.connectors {
                println!(
                    "  {} ({}) ← {}",
                    connector.name,
                    connector.file.display(),
                    connector.source.topics.join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprint!("{problems}");
            ExitCode::from(2)
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
