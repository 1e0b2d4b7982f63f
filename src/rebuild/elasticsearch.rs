//! Rebuilds of Elasticsearch read models: replay the whole log into
//! `<alias>-v<N+1>` beside the live `<alias>-v<N>`, then move the alias.
//!
//! * The new index is created with the connector's mappings and settings,
//!   but with `refresh_interval: -1` and no replicas while it loads; the
//!   live index's values are put back before the swap.
//! * Positions live in Kafka's committed offsets: the live connector's group
//!   and a fresh group per rebuild attempt (an earlier attempt's index is
//!   dropped, so its offsets must not be reused).
//! * Cut-over: once the rebuild has reached the live positions, and then
//!   the log's end as it was then, the live index gets a write block. The
//!   live connector's writes then fail and are retried (a block is not the
//!   document's fault), so its committed positions stop moving; once they
//!   have been still for [`SETTLED`], the rebuild catches up to them or,
//!   further, to the log's end read under the block ([`CutOverTarget`]: a
//!   batch written before the block may be committed later), within
//!   [`CUT_OVER_LIMIT`], and one `_aliases` call moves the alias. The block
//!   is lifted whatever happens; the live connector's retried writes then
//!   land in the new index, in order: every write is guarded by its
//!   position, so what the rebuild already applied is a duplicate. A live
//!   batch the block cut in two is written again whole
//!   (`SinkError::WriteBlocked`): its part that landed in the old index
//!   before the block is past the positions caught up to.
//! * Rollback is the same dance backwards: block the current index, let the
//!   previous one catch up from where it stopped (a group whose offsets are
//!   set to the positions saved at cut-over), move the alias back.
//! * State (previous index, its positions) is one document per connector in
//!   the `kawka-rebuilds` index.
//! * A write block is recorded there before it is set, with a lease
//!   ([`BLOCK_LEASE`]) the cut-over renews while it runs. A cut-over killed
//!   before it lifted its block leaves the lease to expire: the daemon
//!   ([`heal_blocks`], every [`HEAL_EVERY`]) and the next rebuild lift such
//!   a block, with a log line.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteParts, IndicesGetAliasParts, IndicesGetSettingsParts, IndicesPutSettingsParts,
    IndicesRefreshParts,
};
use elasticsearch::params::Refresh;
use elasticsearch::{Elasticsearch, GetParts, IndexParts};
use serde_json::{json, Value as Json};
use tokio::sync::watch;

use super::{
    caught_up, follow, furthest, rebuild_settings, runtime_with, Follower, LogStarts, Position, RebuildReport, Started,
};
use crate::pipeline::ConnectorRuntime;
use crate::sink::elasticsearch::{create_body, ElasticsearchSink, ElasticsearchTarget};
use crate::sink::{Sink, Target};
use crate::source::kafka::GroupOffsets;
use crate::status::RebuildProgress;

/// The index that holds one rebuild-state document per connector.
pub const STATE_INDEX: &str = "kawka-rebuilds";

/// How long the live positions must stay still under the write block
/// before they count as final. The live connector commits right after each
/// durable write, so a few seconds cover a commit in flight.
const SETTLED: Duration = Duration::from_secs(3);

/// How long the rebuild's positions may stand still short of the log's end
/// (but past the live positions) before that end counts as unreachable
/// (see [`CutOverTarget`]).
const STUCK: Duration = Duration::from_secs(15);

fn sink(runtime: &ConnectorRuntime) -> anyhow::Result<&ElasticsearchSink> {
    match &runtime.sink {
        Sink::Elasticsearch(sink) => Ok(sink),
        Sink::Postgres(_) => bail!("{} is not an Elasticsearch connector", runtime.settings.name),
    }
}

/// The body of a successful response, or an error naming `what`.
async fn call(
    response: Result<elasticsearch::http::response::Response, elasticsearch::Error>,
    what: &str,
) -> anyhow::Result<Json> {
    let response = response.with_context(|| what.to_string())?;
    let status = response.status_code().as_u16();
    let text = response.text().await.with_context(|| what.to_string())?;
    if !(200..300).contains(&status) {
        bail!("{what}: status {status}: {}", text.chars().take(500).collect::<String>());
    }
    Ok(serde_json::from_str(&text).unwrap_or(Json::Null))
}

/// The index the alias writes to.
async fn current_index(client: &Elasticsearch, alias: &str) -> anyhow::Result<String> {
    let reply = call(
        client.indices().get_alias(IndicesGetAliasParts::Name(&[alias])).send().await,
        &format!("reading alias {alias}"),
    )
    .await?;
    let indices = reply.as_object().context("an alias reply is an object")?;
    let write_index = |index: &&String| indices[*index]["aliases"][alias]["is_write_index"] == true;
    match indices.keys().find(write_index).or_else(|| (indices.len() == 1).then(|| indices.keys().next()).flatten()) {
        Some(index) => Ok(index.clone()),
        None => bail!("alias {alias} points at {} indices and none is its write index", indices.len()),
    }
}

/// N of `<alias>-v<N>`.
fn version_of(alias: &str, index: &str) -> anyhow::Result<i64> {
    index
        .strip_prefix(&format!("{alias}-v"))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("alias {alias} points at {index}, not at {alias}-v<N>"))
}

async fn put_settings(client: &Elasticsearch, index: &str, settings: Json) -> anyhow::Result<()> {
    call(
        client.indices().put_settings(IndicesPutSettingsParts::Index(&[index])).body(settings).send().await,
        &format!("updating the settings of {index}"),
    )
    .await
    .map(drop)
}

/// Sets or lifts the write block of `index`.
async fn block_writes(client: &Elasticsearch, index: &str, blocked: bool) -> anyhow::Result<()> {
    put_settings(client, index, json!({"index": {"blocks": {"write": blocked}}})).await
}

/// The live index's refresh interval and replica count, to put on the new
/// index once it is loaded.
async fn serving_settings(client: &Elasticsearch, index: &str) -> anyhow::Result<Json> {
    let reply = call(
        client.indices().get_settings(IndicesGetSettingsParts::Index(&[index])).send().await,
        &format!("reading the settings of {index}"),
    )
    .await?;
    Ok(carried_settings(&reply[index]["settings"]["index"]))
}

/// Dynamic index settings a user may have changed on the live index, put
/// on the new one at cut-over (static ones, analyzers included, come from
/// the connector's settings and from index templates, which match the new
/// index's name as they matched the live one's).
const CARRIED_SETTINGS: [&str; 13] = [
    "refresh_interval",
    "number_of_replicas",
    "auto_expand_replicas",
    "max_result_window",
    "max_inner_result_window",
    "max_terms_count",
    "mapping",
    "search",
    "indexing",
    "routing",
    "default_pipeline",
    "final_pipeline",
    "priority",
];

/// The settings of the live index (`settings.index` of `_settings`) to put
/// on the new one: [`CARRIED_SETTINGS`] where set, with the serving
/// defaults for refresh and replicas (the new index loads without either).
fn carried_settings(live: &Json) -> Json {
    let mut index = serde_json::Map::new();
    for key in CARRIED_SETTINGS {
        if let Some(value) = live.get(key).filter(|v| !v.is_null()) {
            index.insert(key.to_string(), value.clone());
        }
    }
    index.entry("refresh_interval").or_insert(json!("1s"));
    index.entry("number_of_replicas").or_insert(json!(1));
    json!({ "index": index })
}

/// The body that creates the new version: the connector's mappings and
/// settings, no alias yet, no refreshes and no replicas while it loads.
fn load_body(target: &ElasticsearchTarget) -> Json {
    let mut body = create_body(target, &target.alias);
    if let Some(object) = body.as_object_mut() {
        object.remove("aliases");
    }
    let settings = body
        .as_object_mut()
        .and_then(|b| b.entry("settings").or_insert_with(|| json!({})).as_object_mut().map(std::mem::take));
    let mut settings = settings.unwrap_or_default();
    // The same setting may be written flat or under `index`: keep one.
    for key in ["refresh_interval", "number_of_replicas", "index.refresh_interval", "index.number_of_replicas"] {
        settings.remove(key);
    }
    let index = settings.entry("index").or_insert_with(|| json!({}));
    if let Some(index) = index.as_object_mut() {
        index.insert("refresh_interval".into(), json!("-1"));
        index.insert("number_of_replicas".into(), json!(0));
    }
    body["settings"] = Json::Object(settings);
    body
}

async fn delete_index(client: &Elasticsearch, index: &str) -> anyhow::Result<()> {
    let response = client.indices().delete(IndicesDeleteParts::Index(&[index])).send().await?;
    let status = response.status_code().as_u16();
    if status != 404 {
        call(Ok(response), &format!("deleting {index}")).await?;
    }
    Ok(())
}

/// One `_aliases` call: readers see one index or the other, never neither.
async fn move_alias(client: &Elasticsearch, alias: &str, from: &str, to: &str) -> anyhow::Result<()> {
    let actions = json!({"actions": [
        {"remove": {"index": from, "alias": alias}},
        {"add": {"index": to, "alias": alias, "is_write_index": true}},
    ]});
    call(client.indices().update_aliases().body(actions).send().await, &format!("moving alias {alias} to {to}"))
        .await
        .map(drop)
}

/// What a connector's last rebuild left.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct RebuildState {
    version: i64,
    previous_index: Option<String>,
    /// Where the previous index stopped (JSON text: the document's fields
    /// stay plain for dynamic mappings).
    previous_positions: Option<String>,
    /// An index a cut-over (or rollback) write-blocked and has not lifted
    /// yet, and until when its lease runs (ms since the epoch).
    #[serde(default)]
    blocked_index: Option<String>,
    #[serde(default)]
    block_expires_ms: Option<i64>,
}

/// How long a recorded write block is trusted to be its cut-over's: it is
/// renewed every third of it while the cut-over runs; once it has run out,
/// the block is a dead cut-over's and is lifted.
pub const BLOCK_LEASE: Duration = Duration::from_secs(15);

/// How often the daemon looks for an expired block of its connectors.
pub const HEAL_EVERY: Duration = Duration::from_secs(5);

/// Write-blocks `index` for a cut-over of `connector`: the block is
/// recorded (with its lease) first, so that no block exists unrecorded;
/// the lease is renewed until the returned guard is ended.
async fn block_for_cut_over(client: &Elasticsearch, connector: &str, index: &str) -> anyhow::Result<Lease> {
    let mut state = load_state(client, connector).await?.unwrap_or_default();
    state.blocked_index = Some(index.to_string());
    state.block_expires_ms = Some(crate::status::now_ms() + BLOCK_LEASE.as_millis() as i64);
    save_state(client, connector, &state).await?;
    // Renewed from before the block is asked for: a block request slower
    // than the lease would otherwise be lifted by a healer meanwhile, and
    // land after it, unrecorded.
    let renew = {
        let (client, connector) = (client.clone(), connector.to_string());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(BLOCK_LEASE / 3).await;
                let Ok(Some(mut state)) = load_state(&client, &connector).await else { continue };
                state.block_expires_ms = Some(crate::status::now_ms() + BLOCK_LEASE.as_millis() as i64);
                if let Err(error) = save_state(&client, &connector, &state).await {
                    tracing::warn!(%connector, error = %format!("{error:#}"), "renewing the cut-over's block lease failed");
                }
            }
        })
    };
    if let Err(error) = block_writes(client, index, true).await {
        renew.abort();
        return Err(error);
    }
    Ok(Lease { renew })
}

/// The renewal of a block's lease; [`Lease::end`] stops it.
struct Lease {
    renew: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Stops renewing and lifts the block; the state's record of it is
    /// cleared by the caller's next `save_state` (or here, when `clear`).
    async fn end(self, client: &Elasticsearch, connector: &str, index: &str, clear: bool) -> anyhow::Result<()> {
        self.renew.abort();
        let _ = self.renew.await;
        block_writes(client, index, false).await?;
        if clear {
            if let Some(mut state) = load_state(client, connector).await? {
                state.blocked_index = None;
                state.block_expires_ms = None;
                save_state(client, connector, &state).await?;
            }
        }
        Ok(())
    }
}

/// Lifts a write block a dead cut-over of `connector` left (its lease ran
/// out). Returns the index it lifted, if any.
pub async fn heal_blocks(sink: &ElasticsearchSink, connector: &str) -> anyhow::Result<Option<String>> {
    let client = sink.client();
    let Some(mut state) = load_state(client, connector).await? else { return Ok(None) };
    let Some(index) = state.blocked_index.clone() else { return Ok(None) };
    if state.block_expires_ms.is_some_and(|expires| expires > crate::status::now_ms()) {
        return Ok(None);
    }
    block_writes(client, &index, false).await?;
    state.blocked_index = None;
    state.block_expires_ms = None;
    save_state(client, connector, &state).await?;
    tracing::warn!(%connector, %index, "lifted the write block a cut-over that did not finish left on the index");
    Ok(Some(index))
}

async fn load_state(client: &Elasticsearch, connector: &str) -> anyhow::Result<Option<RebuildState>> {
    let response = client.get(GetParts::IndexId(STATE_INDEX, connector)).send().await?;
    if response.status_code().as_u16() == 404 {
        return Ok(None);
    }
    let reply = call(Ok(response), &format!("reading the rebuild state of {connector}")).await?;
    Ok(Some(serde_json::from_value(reply["_source"].clone()).context("the rebuild state document")?))
}

async fn save_state(client: &Elasticsearch, connector: &str, state: &RebuildState) -> anyhow::Result<()> {
    let create = client
        .indices()
        .create(IndicesCreateParts::Index(STATE_INDEX))
        .body(json!({"mappings": {"dynamic": false, "properties": {}}}))
        .send()
        .await?;
    if create.status_code().as_u16() != 400 {
        call(Ok(create), &format!("creating {STATE_INDEX}")).await?;
    }
    call(
        client.index(IndexParts::IndexId(STATE_INDEX, connector)).refresh(Refresh::True).body(state).send().await,
        &format!("saving the rebuild state of {connector}"),
    )
    .await
    .map(drop)
}

/// One group's committed offsets, read through one Kafka client for the
/// whole rebuild (they are polled several times a second).
struct CommittedOffsets {
    group: String,
    reader: Arc<GroupOffsets>,
    /// For a rebuild's group: the floor under its positions.
    starts: Option<LogStarts>,
}

impl CommittedOffsets {
    /// The group `runtime`'s connector consumes in, on its topics.
    async fn of(runtime: &ConnectorRuntime) -> anyhow::Result<CommittedOffsets> {
        let (kafka, source) = (runtime.kafka.clone(), runtime.settings.source.clone());
        let group = source.group_id.clone();
        let reader = tokio::task::spawn_blocking(move || GroupOffsets::of_source(&kafka, &source))
            .await?
            .with_context(|| format!("reading the offsets of group {group}"))?;
        Ok(CommittedOffsets { group, reader: Arc::new(reader), starts: None })
    }

    /// The group of `rebuilder` (a rebuild, or a rollback's catch-up), its
    /// positions raised to where the logs start (see [`LogStarts`]).
    async fn of_rebuild(rebuilder: &ConnectorRuntime) -> anyhow::Result<CommittedOffsets> {
        let offsets = CommittedOffsets::of(rebuilder).await?;
        Ok(CommittedOffsets { starts: Some(LogStarts::new(offsets.reader.clone())), ..offsets })
    }

    /// (topic, partition, next offset), sorted.
    async fn read(&self) -> anyhow::Result<Vec<Position>> {
        self.read_toward(&[]).await
    }

    /// As [`CommittedOffsets::read`]; a rebuild's raised to where the logs
    /// start, asking of the partitions that stand short of `toward`.
    async fn read_toward(&self, toward: &[Position]) -> anyhow::Result<Vec<Position>> {
        let reader = self.reader.clone();
        let mut offsets = tokio::task::spawn_blocking(move || reader.read())
            .await?
            .with_context(|| format!("the committed offsets of group {}", self.group))?;
        offsets.sort();
        Ok(match &self.starts {
            Some(starts) => starts.floor(offsets, toward).await,
            None => offsets,
        })
    }

    /// Where the log of each of the group's partitions ends now (asked up
    /// to three times: a failure here would cost the whole rebuild).
    async fn ends(&self) -> anyhow::Result<Vec<Position>> {
        let mut attempt = 0;
        loop {
            let reader = self.reader.clone();
            match tokio::task::spawn_blocking(move || reader.ends()).await? {
                Ok(ends) => return Ok(ends),
                Err(error) if attempt < 2 => {
                    tracing::warn!(group = %self.group, %error, "reading the high watermarks failed; asking again");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => return Err(error).context("the high watermarks of the topics"),
            }
        }
    }
}

/// What the rebuild catches up to under the write block, per partition:
/// the live connector's settled position or, when further, the end of the
/// log read under the block. The live index can hold events past the live
/// positions (a batch written just before the block whose commit comes
/// later), but none past that end: a write sent after the block is
/// refused, one sent before it holds events produced before it. An end the
/// rebuild cannot reach (a broker that misreports it, transaction markers
/// closing the log) is given up once the rebuild is past the live
/// positions, has no write on its way and has stood still for [`STUCK`],
/// with a warning.
struct CutOverTarget {
    connector: String,
    live: Vec<Position>,
    ends: Vec<Position>,
    /// The rebuild's positions last seen, and since when they are so.
    last: Vec<Position>,
    still_since: Instant,
    gave_up: bool,
}

impl CutOverTarget {
    fn new(connector: &str, live: Vec<Position>, ends: Vec<Position>) -> CutOverTarget {
        CutOverTarget {
            connector: connector.to_string(),
            live,
            ends,
            last: Vec::new(),
            still_since: Instant::now(),
            gave_up: false,
        }
    }

    /// The live positions moved (a late commit): they are the floor now.
    fn live_moved(&mut self, live: Vec<Position>) {
        self.live = live;
    }

    /// A follower starts: standing still is counted from its first look.
    fn restart(&mut self) {
        (self.last, self.still_since) = (Vec::new(), Instant::now());
    }

    /// The positions to reach, per partition with anything to reach.
    fn wanted(&self) -> Vec<Position> {
        let mut wanted = furthest(&self.live, &self.ends);
        // An empty partition has nothing to reach (and no position to show).
        wanted.retain(|(_, _, next)| *next > 0);
        wanted
    }

    /// The target given the rebuild's positions `done` now (sorted, as
    /// [`CommittedOffsets::read`] gives them); `consuming`: whether its
    /// consumer has partitions (a group join takes seconds, and stands
    /// still meanwhile); `writing`: whether a batch of it is on its way to
    /// the sink (a slow write stands still too, but is not the end).
    fn given(&mut self, done: &[Position], consuming: bool, writing: bool) -> Vec<Position> {
        if done != self.last || !consuming || writing {
            (self.last, self.still_since) = (done.to_vec(), Instant::now());
        }
        let wanted = self.wanted();
        if caught_up(&wanted, done) || !caught_up(&self.live, done) || self.still_since.elapsed() < STUCK {
            return wanted;
        }
        if !std::mem::replace(&mut self.gave_up, true) {
            tracing::warn!(connector = %self.connector, rebuilt = ?done, ends = ?self.ends,
                "the rebuild stands still short of the log's end the broker reports; going on from where it is");
        }
        done.to_vec()
    }
}

/// The longest a cut-over keeps the live index blocked while it catches
/// up: past it the block is lifted and the alias stays (a rebuild consumer
/// that never gets its partitions, say); the rebuild can be run again.
const CUT_OVER_LIMIT: Duration = Duration::from_secs(300);

/// `catching_up` (the part of a cut-over before the swap), failed once it
/// has run for [`CUT_OVER_LIMIT`]. A follower it drops stops (see
/// `Follower`'s `Drop`).
async fn within_limit<T>(catching_up: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(CUT_OVER_LIMIT, catching_up).await {
        Ok(caught_up) => caught_up,
        Err(_) => bail!("the rebuild did not catch up within {CUT_OVER_LIMIT:?} of the write block"),
    }
}

/// The live positions once they have stopped moving (the live index is
/// write-blocked, so only a commit already in flight can still land).
async fn settled(live: &CommittedOffsets, shutdown: &watch::Receiver<bool>) -> anyhow::Result<Vec<Position>> {
    let mut last = live.read().await?;
    let mut still_since = Instant::now();
    loop {
        if *shutdown.borrow() {
            bail!("interrupted");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = live.read().await?;
        if now != last {
            (last, still_since) = (now, Instant::now());
        } else if still_since.elapsed() >= SETTLED {
            return Ok(last);
        }
    }
}

/// Runs `runtime` (writing to one index) until its group's positions
/// (`done`) reach `target`, then stops it.
async fn catch_up(
    runtime: &ConnectorRuntime,
    done: &CommittedOffsets,
    target: &Mutex<CutOverTarget>,
    shutdown: &watch::Receiver<bool>,
    started: &Started,
    progress: &mut impl FnMut(&RebuildProgress),
) -> anyhow::Result<()> {
    // Reached already: no consumer started and stopped at once (a close
    // right after the join can hang, see `KafkaSource::stop`, and the
    // member it leaves in the group holds its partitions from the next
    // follower: seen on tansu as a cut-over waiting forever).
    let wanted = target.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).wanted();
    if caught_up(&wanted, &done.read_toward(&wanted).await?) {
        return Ok(());
    }
    let follower = Follower::start(runtime);
    let followed = follow_target(runtime, &follower, done, target, shutdown, started, progress).await;
    follower.stop().await;
    followed
}

/// Follows `follower` (running `runtime`) until its group's positions
/// reach `target`; fails when it ends on its own.
async fn follow_target(
    runtime: &ConnectorRuntime,
    follower: &Follower,
    done: &CommittedOffsets,
    target: &Mutex<CutOverTarget>,
    shutdown: &watch::Receiver<bool>,
    started: &Started,
    progress: &mut impl FnMut(&RebuildProgress),
) -> anyhow::Result<()> {
    target.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).restart();
    follow(shutdown, started, progress, || async {
        follower.alive()?;
        let wanted = target.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).wanted();
        let done = done.read_toward(&wanted).await?;
        let status = &runtime.status;
        // Retrying (a registry or sink outage) is not standing still either.
        let (consuming, writing) =
            (!status.partitions().is_empty(), status.writes_pending() || status.retrying_for().is_some());
        let wanted = target.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).given(&done, consuming, writing);
        Ok((wanted, done))
    })
    .await
}

/// A connector like the live one writing straight to `index`, in its own
/// fresh consumer group.
fn writer_to(runtime: &ConnectorRuntime, sink: &ElasticsearchSink, index: &str, role: &str) -> ConnectorRuntime {
    let name = format!("{}.{role}", runtime.settings.name);
    let mut settings = rebuild_settings(runtime, &name, 0, |target| {
        if let Target::Elasticsearch(target) = target {
            target.alias = index.to_string();
        }
    });
    settings.source.group_id =
        format!("{}.{role}-{index}-{}", runtime.settings.source.group_id, crate::status::now_ms());
    runtime_with(runtime, settings, Sink::Elasticsearch(sink.writing_to(index)))
}

pub async fn rebuild(
    runtime: ConnectorRuntime,
    shutdown: watch::Receiver<bool>,
    mut progress: impl FnMut(&RebuildProgress),
) -> anyhow::Result<RebuildReport> {
    let live_sink = sink(&runtime)?;
    let (client, alias) = (live_sink.client(), live_sink.alias());
    let live_index = current_index(client, alias).await?;
    let new_index = format!("{alias}-v{}", version_of(alias, &live_index)? + 1);
    // Left over from an interrupted rebuild (killed during a cut-over, it
    // may have left the live index write-blocked): start again.
    let connector = runtime.settings.name.clone();
    if let Some(state) = load_state(client, &connector).await? {
        if let Some(blocked) = state.blocked_index.filter(|_| state.block_expires_ms.is_some()) {
            // Whatever its lease says: this is the rebuild of the connector.
            block_writes(client, &blocked, false).await?;
            tracing::warn!(%connector, index = %blocked, "lifted the write block an unfinished cut-over left");
        }
    }
    delete_index(client, &new_index).await?;
    block_writes(client, &live_index, false).await?;
    call(
        client.indices().create(IndicesCreateParts::Index(&new_index)).body(load_body(live_sink.target())).send().await,
        &format!("creating {new_index}"),
    )
    .await?;
    tracing::info!(connector = %runtime.settings.name, index = %new_index, "rebuild started");
    let rebuilder = writer_to(&runtime, live_sink, &new_index, "rebuild");
    let (live_offsets, rebuild_offsets) =
        (CommittedOffsets::of(&runtime).await?, CommittedOffsets::of_rebuild(&rebuilder).await?);
    let started = Started::now();

    // The bulk of the work, while the live connector goes on; then, still
    // unblocked and by the same consumer, on to the log's end as it is then:
    // under the block the rebuild goes to the end again (see
    // `CutOverTarget`), and what is left then is only what came since, not
    // the live connector's lag.
    let follower = Follower::start(&rebuilder);
    let followed = async {
        follow(&shutdown, &started, &mut progress, || async {
            follower.alive()?;
            let live = live_offsets.read().await?;
            let done = rebuild_offsets.read_toward(&live).await?;
            Ok((live, done))
        })
        .await?;
        let end = Mutex::new(CutOverTarget::new(&connector, live_offsets.read().await?, live_offsets.ends().await?));
        follow_target(&rebuilder, &follower, &rebuild_offsets, &end, &shutdown, &started, &mut progress).await
    }
    .await;
    follower.stop().await;
    followed.context("the alias is unchanged; run the rebuild again")?;

    // The cut-over, with the live index write-blocked.
    let lease = block_for_cut_over(client, &connector, &live_index).await?;
    let swapped = async {
        let live = within_limit(async {
            let mut live = settled(&live_offsets, &shutdown).await?;
            // Read under the block: the live index holds nothing past it.
            let target = Mutex::new(CutOverTarget::new(&connector, live.clone(), live_offsets.ends().await?));
            loop {
                catch_up(&rebuilder, &rebuild_offsets, &target, &shutdown, &started, &mut progress).await?;
                // A write the live connector made just before the block is
                // committed asynchronously: on a loaded machine the commit can
                // land after the positions looked settled. Its events are in
                // the live index only; catch up to them too before the swap
                // (they are within the log's end, unless the broker misreports it).
                let now = live_offsets.read().await?;
                if caught_up(&now, &live) {
                    break;
                }
                tracing::info!(connector = %connector, "live positions moved during the cut-over; catching up again");
                live = now;
                target.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).live_moved(live.clone());
            }
            Ok(live)
        })
        .await?;
        // Read now: what the user changed on the live index while the
        // rebuild ran counts too.
        put_settings(client, &new_index, serving_settings(client, &live_index).await?).await?;
        call(
            client.indices().refresh(IndicesRefreshParts::Index(&[&new_index])).send().await,
            &format!("refreshing {new_index}"),
        )
        .await?;
        move_alias(client, alias, &live_index, &new_index).await?;
        Ok::<_, anyhow::Error>(live)
    }
    .await;
    let unblocked = lease.end(client, &connector, &live_index, swapped.is_err()).await;
    let live = swapped.context("the alias is unchanged; run the rebuild again")?;
    unblocked.with_context(|| format!("the alias moved, but {live_index} is still write-blocked"))?;
    let state = RebuildState {
        version: version_of(alias, &new_index)?,
        previous_index: Some(live_index.clone()),
        previous_positions: Some(serde_json::to_string(&live)?),
        blocked_index: None,
        block_expires_ms: None,
    };
    save_state(client, &runtime.settings.name, &state).await?;
    let events = live.iter().map(|p| p.2.max(0) as u64).sum();
    Ok(started.report(&rebuilder, events, new_index, live_index))
}

/// Moves the alias back to the previous index once it has caught up with
/// the events since the cut-over; returns the index rolled out (kept).
pub async fn rollback(runtime: &ConnectorRuntime, shutdown: watch::Receiver<bool>) -> anyhow::Result<String> {
    let live_sink = sink(runtime)?;
    let (client, alias) = (live_sink.client(), live_sink.alias());
    let connector = &runtime.settings.name;
    let Some(state) = load_state(client, connector).await? else { bail!("{connector} has never been rebuilt") };
    let (Some(previous), Some(stopped_at)) = (&state.previous_index, &state.previous_positions) else {
        bail!("no previous version of {alias} to roll back to (rolled back already, or cleaned up)")
    };
    let stopped_at: Vec<Position> = serde_json::from_str(stopped_at).context("the saved positions")?;
    let current = current_index(client, alias).await?;
    let live_offsets = CommittedOffsets::of(runtime).await?;
    let lease = block_for_cut_over(client, connector, &current).await?;
    let swapped = async {
        within_limit(async {
            let mut live = settled(&live_offsets, &shutdown).await?;
            // Read under the block, as in `rebuild`.
            let target = Mutex::new(CutOverTarget::new(connector, live.clone(), live_offsets.ends().await?));
            let wanted = target.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).wanted();
            if !caught_up(&wanted, &stopped_at) {
                let writer = writer_to(runtime, live_sink, previous, "rollback");
                let (group, from) = (writer.settings.source.group_id.clone(), stopped_at.clone());
                let kafka = runtime.kafka.clone();
                tokio::task::spawn_blocking(move || crate::source::kafka::commit_offsets(&kafka, &group, &from))
                    .await?
                    .context("setting the catch-up group's offsets")?;
                let done = CommittedOffsets::of_rebuild(&writer).await?;
                loop {
                    catch_up(&writer, &done, &target, &shutdown, &Started::now(), &mut |_| {}).await?;
                    // A late commit of a write made before the block (see `rebuild`).
                    let now = live_offsets.read().await?;
                    if caught_up(&now, &live) {
                        break;
                    }
                    live = now;
                    target.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).live_moved(live.clone());
                }
            }
            Ok(())
        })
        .await?;
        move_alias(client, alias, &current, previous).await
    }
    .await;
    let unblocked = lease.end(client, connector, &current, swapped.is_err()).await;
    swapped.context("the alias is unchanged")?;
    unblocked?;
    // The rolled-out index is kept until cleanup; there is nothing to roll
    // forward to.
    let state = RebuildState {
        version: version_of(alias, previous)?,
        previous_index: Some(current.clone()),
        previous_positions: None,
        blocked_index: None,
        block_expires_ms: None,
    };
    save_state(client, connector, &state).await?;
    Ok(current)
}

/// Deletes the previous index kept for rollback.
pub async fn cleanup(runtime: &ConnectorRuntime) -> anyhow::Result<Option<String>> {
    let live_sink = sink(runtime)?;
    let client = live_sink.client();
    let connector = &runtime.settings.name;
    let Some(state) = load_state(client, connector).await? else { return Ok(None) };
    let Some(previous) = state.previous_index.clone() else { return Ok(None) };
    delete_index(client, &previous).await?;
    save_state(client, connector, &RebuildState { previous_index: None, previous_positions: None, ..state }).await?;
    Ok(Some(previous))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_user_set_on_the_live_index_is_carried_over() {
        let live = json!({"refresh_interval": "30s", "number_of_replicas": "2", "max_result_window": "50000",
            "mapping": {"total_fields": {"limit": "2000"}}, "uuid": "x", "creation_date": "1", "blocks": {"write": "true"},
            "number_of_shards": "3", "analysis": {"analyzer": {}}});
        assert_eq!(
            carried_settings(&live),
            json!({"index": {"refresh_interval": "30s", "number_of_replicas": "2", "max_result_window": "50000",
                "mapping": {"total_fields": {"limit": "2000"}}}})
        );
        assert_eq!(carried_settings(&json!({})), json!({"index": {"refresh_interval": "1s", "number_of_replicas": 1}}));
    }

    /// As if the rebuild's positions had been what they are for [`STUCK`].
    fn stand_still(target: &mut CutOverTarget) {
        target.still_since = Instant::now().checked_sub(STUCK).expect("the machine is up for longer than STUCK");
    }

    #[test]
    fn the_cut_over_reaches_the_logs_end_past_the_live_positions_unless_it_cannot() {
        let at = |partition: i32, next: i64| ("t".to_string(), partition, next);
        let mut target = CutOverTarget::new("c", vec![at(0, 10)], vec![at(0, 15), at(1, 0), at(2, 4)]);
        assert_eq!(target.wanted(), vec![at(0, 15), at(2, 4)], "the end where it is further; empty partitions drop");
        assert_eq!(target.given(&[at(0, 12)], true, false), vec![at(0, 15), at(2, 4)]);
        // Still for STUCK, past the live positions, consuming: the end is
        // out of reach (misreported, or transaction markers).
        stand_still(&mut target);
        assert_eq!(target.given(&[at(0, 12)], true, false), vec![at(0, 12)]);
        // Short of the live positions it waits whatever the time.
        stand_still(&mut target);
        assert_eq!(target.given(&[at(0, 9)], true, false), vec![at(0, 15), at(2, 4)]);
        stand_still(&mut target);
        assert_eq!(target.given(&[at(0, 9)], true, false), vec![at(0, 15), at(2, 4)]);
        // Nor is a write on its way.
        let mut writing = CutOverTarget::new("c", vec![at(0, 10)], vec![at(0, 15)]);
        writing.given(&[at(0, 12)], true, true);
        stand_still(&mut writing);
        assert_eq!(writing.given(&[at(0, 12)], true, true), vec![at(0, 15)]);
        // A consumer still joining its group is not standing still.
        let mut joining = CutOverTarget::new("c", vec![at(0, 10)], vec![at(0, 15)]);
        joining.given(&[at(0, 12)], false, false);
        stand_still(&mut joining);
        assert_eq!(joining.given(&[at(0, 12)], false, false), vec![at(0, 15)]);
        // A late commit moves the floor.
        joining.live_moved(vec![at(0, 20)]);
        assert_eq!(joining.wanted(), vec![at(0, 20)]);
    }

    #[test]
    fn versions_come_from_the_index_name() {
        assert_eq!(version_of("orders", "orders-v7").expect("a version"), 7);
        assert!(version_of("orders", "orders").is_err());
        assert!(version_of("orders", "orders-vx").is_err());
    }

    #[test]
    fn the_new_version_loads_without_refreshes_or_replicas_and_without_the_alias() {
        let target = ElasticsearchTarget {
            alias: "orders".into(),
            mappings: Some(json!({"properties": {"total": {"type": "long"}}})),
            settings: Some(json!({"number_of_shards": 2, "refresh_interval": "5s"})),
            max_bulk_bytes: 1 << 20,
            max_bulk_actions: 1000,
            in_flight: 2,
            tombstone_retention: std::time::Duration::from_secs(60),
        };
        let body = load_body(&target);
        assert!(body.get("aliases").is_none(), "{body}");
        assert_eq!(body["settings"]["number_of_shards"], 2);
        assert!(body["settings"].get("refresh_interval").is_none(), "one form of each setting: {body}");
        assert_eq!(body["settings"]["index"], json!({"refresh_interval": "-1", "number_of_replicas": 0}));
        assert_eq!(body["mappings"]["properties"]["total"]["type"], "long");
    }
}
