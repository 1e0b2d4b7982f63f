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
    ///
    /// Example: kawka run --config config/kawka.yaml
    Run {
        /// The daemon config file.
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
    },
    /// Check the daemon config and every connector file, listing every problem
    /// with file and line; exits 2 when there is any.
    ///
    /// Example: kawka validate --against http://127.0.0.1:8080
    Validate {
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
        /// A running daemon's HTTP address: also print what a reload of it
        /// with these files would start, stop, restart or leave untouched
        /// (nothing is changed).
        #[arg(long)]
        against: Option<String>,
    },
    /// Run the upcast chain on one event: reads it as JSON on stdin, prints
    /// the event(s) it becomes at the newest catalogue version.
    ///
    /// Example: echo '{"id": "u1", "fullName": "Ada"}' | kawka upcast com.example.users.UserRegistered --from 1
    Upcast {
        /// The event type, e.g. com.example.users.UserRegistered.
        event_type: String,
        /// The catalogue version of the input.
        #[arg(long)]
        from: u32,
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
    },
    /// Show every connector of a running daemon (state, partitions, lag,
    /// rate, last error) from its HTTP API.
    ///
    /// Example: kawka status --url http://127.0.0.1:8080
    Status {
        /// The daemon's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "KAWKA_URL")]
        url: String,
    },
    /// Wait until a running daemon's connector has the events at the given
    /// positions in its read model (read your writes); exits 0 when they
    /// are, 1 when the timeout passes first.
    ///
    /// Example: kawka wait user-profiles --position users:0:1500
    Wait {
        connector: String,
        /// `topic:partition:offset`, as a producer's delivery report gives it; repeat for several.
        #[arg(long = "position", required = true)]
        positions: Vec<String>,
        #[arg(long, default_value = "5s")]
        timeout: String,
        /// The daemon's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "KAWKA_URL")]
        url: String,
    },
    /// Replay the whole log into the next version of a read model (a
    /// Postgres table or an Elasticsearch index) beside the live one, then
    /// swap them atomically (readers never see a half-built model); the
    /// previous version is kept for --rollback.
    ///
    /// Example: kawka rebuild inventory && kawka rebuild inventory --cleanup
    Rebuild {
        connector: String,
        /// Swap back to the previous version.
        #[arg(long, conflicts_with = "cleanup")]
        rollback: bool,
        /// Drop the previous version kept for rollback.
        #[arg(long)]
        cleanup: bool,
        /// Start anew: drop what an unfinished rebuild built (by default
        /// a Postgres rebuild resumes it).
        #[arg(long, conflicts_with_all = ["rollback", "cleanup"])]
        restart: bool,
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
    },
    /// Dead-letter tools.
    ///
    /// Example: kawka dlq replay inventory
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Schema tools.
    ///
    /// Example: kawka schemas check
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// Serve a Confluent-compatible schema registry (Avro) stored in Postgres.
    ///
    /// Example: kawka registry --listen 0.0.0.0:8081 --auth-file registry-auth.yaml
    #[command(args_conflicts_with_subcommands = true)]
    Registry {
        #[command(subcommand)]
        tool: Option<RegistryTool>,
        #[command(flatten)]
        args: RegistryArgs,
    },
    /// Scaffolding.
    ///
    /// Example: kawka new connector accounts --topic accounts --sink readdb
    New {
        #[command(subcommand)]
        what: NewCommand,
    },
    /// Print a shell completion script.
    ///
    /// Example: kawka completions bash > /usr/share/bash-completion/completions/kawka
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), or with --dir write kawka.1 and a page per
    /// command (kawka-run.1, …) there.
    ///
    /// Example: kawka man --dir /usr/local/share/man/man1
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RegistryArgs {
    /// Address to listen on. Beyond loopback, credentials are required
    /// (--auth-file) unless --insecure is given.
    #[arg(long, default_value = "127.0.0.1:8081", env = "KAWKA_REGISTRY_LISTEN")]
    listen: std::net::SocketAddr,
    /// Postgres database that stores the schemas.
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/kawka",
        env = "KAWKA_REGISTRY_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: String,
    /// Postgres schema of the registry's tables (created when missing).
    #[arg(long, env = "KAWKA_REGISTRY_SCHEMA")]
    schema: Option<String>,
    /// Users and tokens with their roles (YAML; see README "Security").
    #[arg(long, env = "KAWKA_REGISTRY_AUTH_FILE", conflicts_with = "auth")]
    auth_file: Option<PathBuf>,
    /// The same as the text of an --auth-file (for a Kubernetes Secret in
    /// an environment variable).
    #[arg(long, env = "KAWKA_REGISTRY_AUTH", hide_env_values = true)]
    auth: Option<String>,
    /// PEM certificate chain: listen with TLS (with --tls-key).
    #[arg(long, env = "KAWKA_REGISTRY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KAWKA_REGISTRY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve without credentials beyond loopback: anyone who reaches the
    /// port may register and delete schemas.
    #[arg(long, env = "KAWKA_REGISTRY_INSECURE")]
    insecure: bool,
    /// Largest request body (a schema with its envelope); larger get 413.
    #[arg(long, default_value = "2MiB", value_parser = parse_size)]
    max_request_bytes: usize,
    /// Time a client has to send a request's headers (or finish a TLS
    /// handshake), then its body.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    client_timeout: std::time::Duration,
    /// Requests handled at once; more get 503.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
}

#[derive(Subcommand)]
enum RegistryTool {
    /// Read a password on stdin, print its argon2 hash for the auth file.
    ///
    /// Example: printf %s "$PASSWORD" | kawka registry hash-password
    HashPassword,
    /// Read a token on stdin, print its SHA-256 for the auth file.
    ///
    /// Example: printf %s "$TOKEN" | kawka registry hash-token
    HashToken,
}

/// `kawka new connector`: reads the registry, writes the files, says what it wrote.
async fn new_connector(
    settings: &kawka::config::Settings,
    name: &str,
    topics: &[String],
    sink: &str,
    force: bool,
) -> ExitCode {
    use kawka::scaffold::{self, Store};
    use kawka::sink::SinkConnection;
    if !config::valid_connector_name(name) {
        eprintln!(
            "kawka new connector: `{name}` is not a connector name (letters, digits, `.`, `_`, `-`; no leading `.`)"
        );
        return ExitCode::from(2);
    }
    let store = match settings.sinks.get(sink) {
        Some(SinkConnection::Postgres(_)) => Store::Postgres,
        Some(SinkConnection::Elasticsearch(_)) => Store::Elasticsearch,
        None => {
            let known: Vec<&String> = settings.sinks.keys().collect();
            eprintln!("kawka new connector: no sink `{sink}` in {} (sinks: {known:?})", settings.config_file.display());
            return ExitCode::from(2);
        }
    };
    let file = settings.connectors_dir.join(format!("{name}.yaml"));
    if file.exists() && !force {
        eprintln!("kawka new connector: {} exists (--force overwrites it)", file.display());
        return ExitCode::from(2);
    }
    let client = match kawka::codec::registry::RegistryClient::new(&settings.schema_registry) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("kawka new connector: {error:#}");
            return ExitCode::from(2);
        }
    };
    let found = match scaffold::fetch(&client, topics).await {
        Ok(found) => found,
        Err(error) => {
            eprintln!("kawka new connector: registry {}: {error}", settings.schema_registry.url);
            return ExitCode::FAILURE;
        }
    };
    if found.is_empty() {
        eprintln!("kawka new connector: no value schema is registered for {topics:?} (subjects <topic>-value or <topic>-<record>)");
        return ExitCode::FAILURE;
    }
    let scaffold = scaffold::plan(name, topics, sink, store, &found, &settings.catalogue);
    let mut written = Vec::new();
    for (path, text) in &scaffold.schemas {
        written.push((settings.schemas_dir.join(path), text.as_str()));
    }
    written.push((file, scaffold.connector.as_str()));
    for (path, text) in written {
        let result = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&path, text));
        if let Err(error) = result {
            eprintln!("kawka new connector: cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    for note in &scaffold.notes {
        println!("note: {note}");
    }
    println!("{} event type(s); edit the key and the rules, then run `kawka validate`", found.len());
    ExitCode::SUCCESS
}

/// The man pages: one for kawka (to stdout), or with `dir` one per command too.
fn man(dir: Option<&std::path::Path>) -> ExitCode {
    let command = <Cli as clap::CommandFactory>::command();
    let written = match dir {
        None => clap_mangen::Man::new(command).render(&mut std::io::stdout()),
        Some(dir) => clap_mangen::generate_to(command, dir),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kawka: cannot write the man pages: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse_size(text: &str) -> Result<usize, String> {
    kawka::config::parse_size(text).and_then(|n| usize::try_from(n).map_err(|_| format!("{text} is too large")))
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Feed a connector's dead letters back through it (after the cause is
    /// fixed). Events that fail again are dead-lettered again. With
    /// `on_error: park`, each parked key's events are replayed in order; a
    /// key is released once all applied, and stays parked behind an event
    /// that fails again.
    ///
    /// Example: kawka dlq replay inventory --dry-run
    Replay {
        /// The connector's name.
        connector: String,
        /// Say what each dead letter (each parked key) would do now; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replay only this parked key (`on_error: park`): its text, or
        /// `0x` and hex for a key that is not printable text.
        #[arg(long)]
        key: Option<String>,
        /// Stop after this long without a new dead letter.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        idle: std::time::Duration,
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
    },
    /// Release a parked key without replaying it (`on_error: park`): the
    /// hole in its history is accepted, its parked events stay unapplied
    /// in the dead-letter topic, and its later events apply.
    ///
    /// Example: kawka dlq release user-profiles --key user-42
    Release {
        /// The connector's name.
        connector: String,
        /// The parked key: its text, or `0x` and hex.
        #[arg(long)]
        key: String,
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    kawka::config::parse_duration(text)
}

#[derive(Subcommand)]
enum NewCommand {
    /// Write a connector for existing topics from their newest registered
    /// schemas: catalogue entries (schemas/<type>/v<N>.avsc) for types not
    /// catalogued yet, and a commented connector file with a column or
    /// mapping per field, a guessed key and a rule per event type to edit.
    ///
    /// Example: kawka new connector accounts --topic accounts --sink readdb
    Connector {
        /// The connector's name (and its table or index).
        name: String,
        /// A topic to read; repeat for several.
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
        /// A sink of the daemon config (its type decides columns or mappings).
        #[arg(long)]
        sink: String,
        /// Overwrite an existing connector file.
        #[arg(long)]
        force: bool,
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SchemasCommand {
    /// Check every schema registered under the connectors' subjects against
    /// the catalogue (matched by fingerprint, or readable as the newest
    /// version); exits 2 when one cannot be read.
    ///
    /// Example: kawka schemas check
    Check {
        #[arg(short, long, default_value = "config/kawka.yaml", env = "KAWKA_CONFIG")]
        config: PathBuf,
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
        Command::Validate { config, against } => {
            let code = validate(&config);
            match against {
                Some(url) if config::load(&config).is_ok() => runtime.block_on(plan_against(&config, &url)),
                _ => code,
            }
        }
        Command::Run { config } => {
            let settings = match load(&config) {
                Ok(settings) => settings,
                Err(code) => return code,
            };
            kawka::telemetry::init(cli.log_format.unwrap_or(settings.log.format), &settings.log.level);
            let code = match runtime.block_on(kawka::app::run(settings, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("kawka run: {error:#}");
                    ExitCode::FAILURE
                }
            };
            // The drain is over (each step of it bounded): blocking work
            // still running (a hung client call) must not hold the exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
            code
        }
        Command::Status { url } => runtime.block_on(status(&url)),
        Command::Wait { connector, positions, timeout, url } => {
            runtime.block_on(wait(&connector, &positions, &timeout, &url))
        }
        Command::Rebuild { connector, rollback, cleanup, restart, config } => {
            let settings = match load(&config) {
                Ok(settings) => settings,
                Err(code) => return code,
            };
            kawka::telemetry::init(cli.log_format.unwrap_or(settings.log.format), "warn");
            runtime.block_on(rebuild(settings, &connector, rollback, cleanup, restart))
        }
        Command::Dlq { command: DlqCommand::Replay { connector, dry_run, key, idle, config } } => {
            let settings = match load(&config) {
                Ok(settings) => settings,
                Err(code) => return code,
            };
            kawka::telemetry::init(cli.log_format.unwrap_or(settings.log.format), "warn");
            runtime.block_on(dlq_replay(settings, &connector, dry_run, key.as_deref(), idle))
        }
        Command::Dlq { command: DlqCommand::Release { connector, key, config } } => {
            let settings = match load(&config) {
                Ok(settings) => settings,
                Err(code) => return code,
            };
            kawka::telemetry::init(cli.log_format.unwrap_or(settings.log.format), "warn");
            runtime.block_on(dlq_release(settings, &connector, &key))
        }
        Command::Upcast { event_type, from, config } => upcast(&config, &event_type, from),
        Command::Schemas { command: SchemasCommand::Check { config } } => {
            let settings = match load(&config) {
                Ok(settings) => settings,
                Err(code) => return code,
            };
            runtime.block_on(schemas_check(&settings))
        }
        Command::Registry { tool: Some(tool), .. } => registry_tool(tool),
        Command::New { what: NewCommand::Connector { name, topics, sink, force, config } } => match load(&config) {
            Ok(settings) => runtime.block_on(new_connector(&settings, &name, &topics, &sink, force)),
            Err(code) => code,
        },
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "kawka",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man { dir } => man(dir.as_deref()),
        Command::Registry { tool: None, args } => {
            kawka::telemetry::init(cli.log_format.unwrap_or_default(), "info");
            let settings = match registry_settings(args) {
                Ok(settings) => settings,
                Err(error) => {
                    eprintln!("kawka registry: {error}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(kawka_registry::serve(settings, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("kawka registry: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn registry_settings(args: RegistryArgs) -> Result<kawka_registry::RegistryServerSettings, String> {
    let auth = match (&args.auth_file, &args.auth) {
        (Some(file), _) => {
            let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            Some(kawka_registry::auth::Authenticator::parse(&text, &file.display().to_string()))
        }
        (None, Some(text)) if !text.trim().is_empty() => {
            Some(kawka_registry::auth::Authenticator::parse(text, "KAWKA_REGISTRY_AUTH"))
        }
        (None, _) => None,
    }
    .transpose()
    .map_err(|e| e.to_string())?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(kawka_http::tls_acceptor(cert, key).map_err(|e| e.to_string())?),
        _ => None,
    };
    let mut settings = kawka_registry::RegistryServerSettings::new(args.listen, args.database_url);
    settings.schema = args.schema;
    settings.auth = auth;
    settings.tls = tls;
    settings.insecure = args.insecure;
    settings.limits.max_body_bytes = args.max_request_bytes;
    settings.limits.header_timeout = args.client_timeout;
    settings.limits.body_timeout = args.client_timeout;
    settings.limits.max_in_flight = args.max_in_flight;
    Ok(settings)
}

fn registry_tool(tool: RegistryTool) -> ExitCode {
    let mut line = String::new();
    if let Err(error) = std::io::stdin().read_line(&mut line) {
        eprintln!("kawka registry: cannot read stdin: {error}");
        return ExitCode::FAILURE;
    }
    let secret = line.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        eprintln!("kawka registry: stdin is empty");
        return ExitCode::from(2);
    }
    match tool {
        RegistryTool::HashPassword => match kawka_registry::auth::hash_password(secret) {
            Ok(hash) => println!("{hash}"),
            Err(error) => {
                eprintln!("kawka registry: cannot hash: {error}");
                return ExitCode::FAILURE;
            }
        },
        RegistryTool::HashToken => {
            if secret.len() < 32 {
                eprintln!("kawka registry: a token must be a random string of 32 characters or more");
                return ExitCode::from(2);
            }
            println!("{}", kawka_registry::auth::hash_token(secret));
        }
    }
    ExitCode::SUCCESS
}

/// Loads the configuration, or prints every problem and gives exit code 2.
fn load(config: &std::path::Path) -> Result<kawka::config::Settings, ExitCode> {
    config::load(config).map_err(|problems| {
        eprint!("{problems}");
        ExitCode::from(2)
    })
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

/// What a reload of the daemon at `url` with these files would do.
async fn plan_against(config: &std::path::Path, url: &str) -> ExitCode {
    let Ok(settings) = config::load(config) else { return ExitCode::from(2) };
    let endpoint = format!("{}/connectors?expand=info", url.trim_end_matches('/'));
    let fetched = async {
        reqwest::get(&endpoint)
            .await?
            .error_for_status()?
            .json::<std::collections::BTreeMap<String, serde_json::Value>>()
            .await
    };
    let running = match fetched.await {
        Ok(running) => running,
        Err(error) => {
            unreachable_daemon("validate", &endpoint, &error);
            return ExitCode::FAILURE;
        }
    };
    let running: std::collections::BTreeMap<String, String> = running
        .into_iter()
        .map(|(name, entry)| {
            let fingerprint = entry["info"]["fingerprint"].as_str().unwrap_or_default().to_string();
            (name, fingerprint)
        })
        .collect();
    let plan = kawka::reload::plan(&running, &kawka::reload::fingerprints(&settings));
    println!("a reload of {} would:", kawka::secret::redact_url(url));
    for line in plan.lines() {
        println!("  {line}");
    }
    ExitCode::SUCCESS
}

fn upcast(config: &std::path::Path, event_type: &str, from: u32) -> ExitCode {
    let settings = match load(config) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    let mut input = String::new();
    if let Err(error) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
        eprintln!("kawka upcast: cannot read stdin: {error}");
        return ExitCode::FAILURE;
    }
    let json: serde_json::Value = match serde_json::from_str(&input) {
        Ok(json) => json,
        Err(error) => {
            eprintln!("kawka upcast: stdin is not one JSON event: {error}");
            return ExitCode::from(2);
        }
    };
    if settings.catalogue.version(event_type, from).is_none() {
        eprintln!("kawka upcast: the catalogue has no v{from} of {event_type}");
        return ExitCode::from(2);
    }
    let event = kawka::event::Event {
        event_type: kawka::value::intern(event_type),
        version: from,
        payload: kawka::value::Value::from_json(&json),
        key: kawka::value::Value::Null,
        position: kawka::event::Position { topic: "stdin", partition: 0, offset: 0 },
        timestamp: None,
    };
    let upcasting = kawka::app::Builder::new().upcasting(&settings);
    match upcasting.to_newest(event) {
        Ok(events) => {
            for event in events {
                let out = serde_json::json!({"type": event.event_type, "version": event.version, "event": event.payload.to_json()});
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kawka upcast: {error}");
            ExitCode::from(2)
        }
    }
}

async fn schemas_check(settings: &kawka::config::Settings) -> ExitCode {
    let client = match kawka::codec::registry::RegistryClient::new(&settings.schema_registry) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("kawka schemas check: {error:#}");
            return ExitCode::from(2);
        }
    };
    match kawka::upcast::online::check(&settings.catalogue, &settings.consumed(), &client).await {
        Ok(findings) => {
            for f in &findings {
                let mark = if f.ok { "ok " } else { "BAD" };
                println!("{mark} {} v{} (id {}): {}: {}", f.subject, f.version, f.id, f.event_type, f.verdict);
            }
            let bad = findings.iter().filter(|f| !f.ok).count();
            println!("{} schema(s) checked, {bad} unreadable", findings.len());
            if bad > 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("kawka schemas check: registry {}: {error}", settings.schema_registry.url);
            ExitCode::FAILURE
        }
    }
}

async fn wait(connector: &str, positions: &[String], timeout: &str, url: &str) -> ExitCode {
    for position in positions {
        if let Err(message) = position.parse::<kawka::applied::Wanted>() {
            eprintln!("kawka wait: {message}");
            return ExitCode::from(2);
        }
    }
    let endpoint = format!("{}/connectors/{connector}/applied", url.trim_end_matches('/'));
    let mut query: Vec<(&str, &str)> = positions.iter().map(|p| ("position", p.as_str())).collect();
    query.push(("timeout", timeout));
    let response = match reqwest::Client::new().get(&endpoint).query(&query).send().await {
        Ok(response) => response,
        Err(error) => {
            unreachable_daemon("wait", &endpoint, &error);
            return ExitCode::FAILURE;
        }
    };
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    println!("{body}");
    match status {
        200 => ExitCode::SUCCESS,
        202 => {
            eprintln!("kawka wait: not applied within {timeout}");
            ExitCode::FAILURE
        }
        _ => ExitCode::from(2),
    }
}

/// The one line a command prints when a daemon's HTTP API cannot be asked
/// (the URL without its password, the whole cause).
fn unreachable_daemon(command: &str, url: &str, error: &reqwest::Error) {
    eprintln!("kawka {command}: {}: {}", kawka::secret::redact_url(url), kawka::codec::registry::error_chain(error));
}

async fn status(url: &str) -> ExitCode {
    let url = format!("{}/connectors", url.trim_end_matches('/'));
    let fetch = || async {
        let response = reqwest::get(&url).await?.error_for_status()?;
        response.json::<Vec<serde_json::Value>>().await
    };
    let first = match fetch().await {
        Ok(first) => first,
        Err(error) => {
            unreachable_daemon("status", &url, &error);
            return ExitCode::FAILURE;
        }
    };
    // A second sample a second later gives the rate.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let second = fetch().await.unwrap_or_else(|_| first.clone());
    println!(
        "{:<24} {:<10} {:<8} {:>10} {:>10} {:>12}  LAST ERROR",
        "CONNECTOR", "STATE", "SINK", "PARTITIONS", "LAG", "EVENTS/S"
    );
    for connector in &second {
        let name = connector["name"].as_str().unwrap_or("?");
        let written = |c: &serde_json::Value| c["counters"]["written"].as_u64().unwrap_or(0);
        let before = first.iter().find(|c| c["name"] == connector["name"]).map_or(written(connector), written);
        let rate = written(connector).saturating_sub(before);
        let lag = connector["lag"].as_i64().map_or("-".to_string(), |lag| lag.to_string());
        let error = connector["last_error"]["message"].as_str().unwrap_or("");
        println!(
            "{:<24} {:<10} {:<8} {:>10} {:>10} {:>12}  {}",
            name,
            connector["state"].as_str().unwrap_or("?"),
            connector["sink"].as_str().unwrap_or("?"),
            connector["partitions"].as_array().map_or(0, Vec::len),
            lag,
            rate,
            error.chars().take(60).collect::<String>()
        );
    }
    for connector in &second {
        let rebuild = &connector["rebuild"];
        if rebuild.is_null() {
            continue;
        }
        let state = rebuild["state"].as_str().unwrap_or("?");
        let line = match serde_json::from_value::<kawka::status::RebuildProgress>(rebuild.clone()) {
            Ok(progress) if state == "running" => kawka::rebuild::progress_line(&progress),
            _ => rebuild["message"].as_str().unwrap_or("").to_string(),
        };
        println!("rebuild of {} ({state}): {line}", connector["name"].as_str().unwrap_or("?"));
    }
    ExitCode::SUCCESS
}

/// The runtime of one connector, for the `dlq` commands.
fn dlq_runtime(
    settings: &kawka::config::Settings,
    connector: &str,
    command: &str,
) -> Result<kawka::pipeline::ConnectorRuntime, ExitCode> {
    let runtimes = match kawka::app::connectors(settings) {
        Ok(runtimes) => runtimes,
        Err(error) => {
            eprintln!("kawka dlq {command}: {error:#}");
            return Err(ExitCode::FAILURE);
        }
    };
    runtimes.into_iter().find(|r| r.settings.name == connector).ok_or_else(|| {
        eprintln!("kawka dlq {command}: no connector named {connector}");
        ExitCode::from(2)
    })
}

async fn dlq_replay(
    settings: kawka::config::Settings,
    connector: &str,
    dry_run: bool,
    key: Option<&str>,
    idle: std::time::Duration,
) -> ExitCode {
    let runtime = match dlq_runtime(&settings, connector, "replay") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let parks = runtime.settings.on_error == kawka::config::ErrorPolicy::Park;
    let topic = runtime.settings.dead_letter_topic.clone();
    // The plain dead letters first, then the parked keys (also those a
    // connector parked before it stopped parking: they stay held in the
    // dead letters until replayed or released).
    if key.is_none() {
        let code = Box::pin(dlq_replay_plain(runtime.clone(), &topic, dry_run, idle)).await;
        if code != ExitCode::SUCCESS {
            return code;
        }
    }
    let only = key.map(kawka::parked::parse_key);
    // Both replays are boxed: their futures are deep (the connector's
    // whole pipeline; a key's writes through the sinks), and nested in
    // this one their layout overflows rustc's query depth in builds
    // without debug info (the demo profile).
    match Box::pin(kawka::pipeline::replay_parked::replay(&runtime, only.as_deref(), dry_run, idle)).await {
        Ok(reports) => {
            if parks || key.is_some() || !reports.is_empty() {
                print_parked_reports(&topic, &reports, dry_run);
            }
            if let (Some(key), true) = (key, reports.is_empty()) {
                println!("parked key {key}: not parked");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kawka dlq replay: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_parked_reports(topic: &str, reports: &[kawka::pipeline::replay_parked::KeyReport], dry_run: bool) {
    use kawka::pipeline::replay_parked::KeyOutcome;
    let mut released = 0;
    for report in reports {
        let (key, n) = (&report.key, report.replayed);
        let superseded = if report.superseded > 0 {
            format!(" ({} superseded: a version guard found them applied or overtaken)", report.superseded)
        } else {
            String::new()
        };
        let line = match (&report.outcome, dry_run) {
            (KeyOutcome::Released, false) => {
                released += 1;
                format!("replayed {n} event(s){superseded}, released")
            }
            (KeyOutcome::Released, true) => format!("would replay {n} event(s) and release"),
            (KeyOutcome::Failed { at, failure }, false) => format!(
                "replayed {n} event(s){superseded}, stays parked behind {at}: {}: {}",
                failure.stage, failure.message
            ),
            (KeyOutcome::Failed { at, failure }, true) => {
                format!("would replay {n} event(s), then fails at {at}: {}: {}", failure.stage, failure.message)
            }
            (KeyOutcome::Missing { events }, false) => format!(
                "replayed {n} event(s){superseded}, stays parked: {events} parked event(s) not found in {topic}"
            ),
            (KeyOutcome::Missing { events }, true) => {
                format!("would replay {n} event(s), then waits: {events} parked event(s) not found in {topic}")
            }
            (KeyOutcome::Behind { position, .. }, true) => {
                format!("would replay {n} event(s), then waits for the connector to pass {position}")
            }
            (KeyOutcome::Behind { position, applied: true }, false) => format!(
                "replayed {n} event(s){superseded}, every parked event applied; stays parked until the connector \
                 passes {position} (run the replay again then)"
            ),
            (KeyOutcome::Behind { position, .. }, _) => format!(
                "replayed {n} event(s){superseded}; waits for the connector to make its events before {position} \
                 durable (run the replay again then)"
            ),
            (KeyOutcome::Gone, _) => "released or replayed by another run meanwhile".to_string(),
            (KeyOutcome::Changed, _) => format!(
                "replayed {n} event(s){superseded}, stays parked: it changed while this run read it (another \
                 replay, or an earlier failure found late); run the replay again"
            ),
            (KeyOutcome::Error(error), _) => format!("replayed {n} event(s){superseded}, stays parked: {error}"),
        };
        println!("parked key {key}: {line}");
    }
    if dry_run {
        println!("{topic}: {} parked key(s) (dry run: nothing written)", reports.len());
    } else {
        println!(
            "{topic}: {} parked key(s): {released} released, {} still parked",
            reports.len(),
            reports.len() - released
        );
    }
}

async fn dlq_release(settings: kawka::config::Settings, connector: &str, key: &str) -> ExitCode {
    let runtime = match dlq_runtime(&settings, connector, "release") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match kawka::pipeline::replay_parked::release(&runtime, &kawka::parked::parse_key(key)).await {
        Ok(Some(left)) => {
            println!("released parked key {key}: {left} parked event(s) left unapplied");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("kawka dlq release: key {key} is not parked by {connector}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("kawka dlq release: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `kawka dlq replay` of the dead letters that belong to no parked key.
async fn dlq_replay_plain(
    runtime: kawka::pipeline::ConnectorRuntime,
    topic: &str,
    dry_run: bool,
    idle: std::time::Duration,
) -> ExitCode {
    use kawka::pipeline::replay;
    if dry_run {
        return match replay::dry_run(&runtime, idle).await {
            Ok(lines) => {
                let ok = lines.iter().filter(|l| l.outcome.is_ok()).count();
                for line in &lines {
                    match &line.outcome {
                        Ok(ops) => println!("{}: would write {ops} op(s)", line.position),
                        Err(failure) => {
                            println!("{}: fails again at {}: {}", line.position, failure.stage, failure.message)
                        }
                    }
                }
                println!(
                    "{topic}: {} dead letter(s), {ok} would be written, {} would fail again (dry run: nothing written)",
                    lines.len(),
                    lines.len() - ok
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("kawka dlq replay: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let replaying = replay::run(replay::replay_runtime(runtime, idle), stopping);
    tokio::pin!(replaying);
    let summary = tokio::select! {
        summary = &mut replaying => summary,
        _ = shutdown_signal() => {
            let _ = stop.send(true);
            replaying.await
        }
    };
    println!(
        "{topic}: read {}, written {}, superseded {} (a guard found them applied or overtaken), \
         failed again {} (dead-lettered again), skipped {}",
        summary.read, summary.written, summary.superseded, summary.failed_again, summary.skipped
    );
    ExitCode::SUCCESS
}

async fn rebuild(
    settings: kawka::config::Settings,
    connector: &str,
    rollback: bool,
    cleanup: bool,
    restart: bool,
) -> ExitCode {
    use kawka::rebuild;
    let runtime = match rebuild::runtime_of(&settings, connector) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kawka rebuild: {error:#}");
            return ExitCode::from(2);
        }
    };
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let result = if rollback {
        rebuild::rollback(&runtime, stopping).await.map(|table| rebuild::rolled_back(&table))
    } else if cleanup {
        rebuild::cleanup(&runtime).await.map(|table| rebuild::cleaned_up(table.as_deref()))
    } else {
        rebuild::rebuild(runtime, restart, stopping, rebuild::print_progress)
            .await
            .map(|report| format!("\n{} (kawka rebuild --rollback / --cleanup)", report.summary()))
    };
    match result {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kawka rebuild: {error:#}");
            ExitCode::FAILURE
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
