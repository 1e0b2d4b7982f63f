//! kawka keeps read models up to date from event streams: it consumes Avro
//! events from Kafka through a Confluent-compatible schema registry, upcasts
//! old event versions to the current ones, projects them, and writes them to
//! Elasticsearch or Postgres, committing offsets only after the writes are
//! durable.
//!
//! kawka is a daemon (`kawka run`) and a library: a custom daemon registers
//! Rust upcasters and projections on the builder and runs the same pipeline.
//!
//! # Layout
//!
//! Data flows one way: `source → codec → upcast → projection → sink`, with
//! the pipeline wiring them. Imports run one way too: each stage defines the
//! settings it is built from; [`config`] builds them from the files; the
//! [`pipeline`] wires the stages; the daemon ([`app`], [`http`], [`rebuild`])
//! sits on top. No stage imports config, the pipeline or the daemon; the
//! leaves ([`event`], [`value`], [`parked`], [`error`], [`status`], [`secret`], [`yaml`])
//! import none of them.
//!
//! * [`config`]: the daemon and connector files: YAML with positions,
//!   `${VAR}` interpolation, serde structs, validation → each stage's settings.
//! * [`app`]: the daemon: builds every connector, runs them under a
//!   supervisor that applies reloads (only changed connectors restart),
//!   drains on a signal.
//! * [`pipeline`]: one connector's loop (decode → upcast → project → batch → plan →
//!   pipelined write → commit), the error policy with its dead-letter
//!   producer, and `kawka dlq replay`.
//! * [`source`]: the Kafka consumer thread, rebalances, records read a chunk
//!   per call, bounded prefetch.
//! * [`codec`]: Confluent framing, the registry client and its schema cache,
//!   Avro decoding into [`event::Event`].
//! * [`upcast`]: the event catalogue (`schemas/`), declarative and Rust
//!   upcasters, the chain that brings every event to its newest version.
//! * [`projection`]: the expression language, the ops of connectors
//!   ([`projection::WriteOp`]) and the one fold of a key's ops that both sinks write.
//! * [`sink`]: the read-model stores: Postgres (exactly-once, positions in
//!   `kawka_offsets`) and Elasticsearch (idempotent guarded bulk writes).
//! * [`rebuild`]: `kawka rebuild`: a new table or index version beside the
//!   live one, atomic cut-over (Postgres renames, an ES alias move),
//!   rollback; also run inside the daemon over HTTP, with progress.
//! * The `kawka registry` server (Confluent API, Postgres storage) is its own
//!   crate, `kawka_registry`, under `crates/kawka-registry`.
//! * [`parked`]: what is stored of a key parked behind its failed event
//!   (`on_error: park`) and the decisions made from it.
//! * [`event`], [`value`]: the event and its position, the positions of
//!   partitions (claims, batch ends), and the value tree every stage shares.
//! * [`yaml`]: YAML with positions and a deserializer that records every
//!   problem; what [`config`] and the declarative upcasters read files with.
//! * [`error`]: the one taxonomy (config / transient / permanent) and backoff.
//! * [`secret`]: secrets in settings, hidden when printed.
//! * [`status`]: each connector's state, counters and histograms: what the
//!   HTTP API and `/metrics` show; one method per happening logs and counts.
//! * [`http`]: health, readiness, metrics, connector control, rebuilds.
//! * [`metrics`]: `/metrics`: the statuses in the OpenMetrics text format
//!   (through `prometheus-client`).
//! * [`reload`]: what a reload of the files changes (fingerprints, plans),
//!   and the handle the HTTP API and signals ask the supervisor through.
//! * [`applied`]: read your writes: wait until events at given positions
//!   are in a connector's read model.
//! * [`scaffold`]: `kawka new connector`: a connector file and catalogue
//!   entries written from the registry's schemas of existing topics.
//! * [`telemetry`]: tracing setup.

pub mod app;
pub mod applied;
pub mod codec;
pub mod config;
pub mod error;
pub mod event;
pub mod http;
pub mod metrics;
pub mod parked;
pub mod pipeline;
pub mod projection;
pub mod rebuild;
pub mod reload;
pub mod scaffold;
pub mod secret;
pub mod sink;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod upcast;
pub mod value;
pub mod yaml;
