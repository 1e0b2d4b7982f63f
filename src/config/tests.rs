//! One test per kind of configuration mistake, on real files.

use super::*;
use crate::projection::OpKind;
use crate::sink::{SinkConnection, Target};

const DAEMON: &str = "\
kafka:
  bootstrap_servers: ${KAFKA:-127.0.0.1:9092}
schema_registry:
  url: http://127.0.0.1:8081
sinks:
  search: { type: elasticsearch, url: http://127.0.0.1:9200 }
  readdb: { type: postgres, url: 'postgres://kawka:hunter2@127.0.0.1:5432/kawka' }
connectors: CONNECTORS
";

const INVENTORY: &str = "\
name: inventory
source: { topics: [shipments, sales] }
sink:
  to: readdb
  table: inventory
  columns: { store_id: text, item_id: text, on_hand: bigint }
  primary_key: [store_id, item_id]
key: { store_id: store_id, item_id: item_id }
batch: { max_events: 1000, max_wait: 50ms, max_bytes: 1MiB }
events:
  com.example.retail.ShipmentReceived: { increment: { on_hand: quantity } }
  com.example.retail.ItemSold:         { decrement: { on_hand: quantity } }
";

const PROFILES: &str = "\
name: user-profiles
source: { topics: [users], start: earliest }
sink: { to: search, index: user-profiles, mappings: { properties: { email: { type: keyword } } } }
key: $key
on_error: dead_letter
dead_letter_topic: users.dlq
tombstones: delete
events:
  com.example.users.UserRegistered:   { upsert: { name: name, email: email, registered_at: $timestamp } }
  com.example.users.UserEmailChanged: { merge: { email: lower(new_email) } }
  com.example.users.UserDeleted:      { delete: {} }
";

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(daemon: &str, connectors: &[(&str, &str)]) -> Project {
        let dir = tempfile::tempdir().expect("temp dir");
        let connectors_dir = dir.path().join("connectors");
        std::fs::create_dir(&connectors_dir).expect("create connectors dir");
        let daemon = daemon.replace("CONNECTORS", &connectors_dir.display().to_string());
        std::fs::write(dir.path().join("kawka.yaml"), daemon).expect("write daemon file");
        for (name, text) in connectors {
            std::fs::write(connectors_dir.join(name), text).expect("write connector");
        }
        Project { dir }
    }

    fn load(&self) -> Result<Settings, Problems> {
        let env = |name: &str| (name == "KAFKA").then(|| "broker:9093".to_string());
        load_with(&self.dir.path().join("kawka.yaml"), &env)
    }

    /// Problems as `file:line field: message`, file names without directory.
    fn problems(&self) -> Vec<String> {
        let Problems(problems) = self.load().expect_err("expected problems");
        problems
            .iter()
            .map(|p| {
                let file = p.file.file_name().and_then(|f| f.to_str()).unwrap_or("?");
                format!("{file}:{} {}: {}", p.line, p.field, p.message)
            })
            .collect()
    }
}

#[test]
fn the_shipped_shape_loads() {
    let project = Project::new(DAEMON, &[("inventory.yaml", INVENTORY), ("user-profiles.yaml", PROFILES)]);
    let settings = project.load().expect("valid configuration");
    assert_eq!(settings.kafka.bootstrap_servers, "broker:9093", "interpolated from the environment");
    assert_eq!(settings.connectors.len(), 2);

    let inventory = &settings.connectors[0];
    assert_eq!(inventory.name, "inventory");
    assert_eq!(inventory.source.group_id, "kawka.inventory");
    assert_eq!(inventory.dead_letter_topic, "inventory.dlq");
    assert_eq!(inventory.batch.max_wait, std::time::Duration::from_millis(50));
    assert_eq!(inventory.batch.max_bytes, 1 << 20);
    // librdkafka fetches two batches ahead (its 100k records by default).
    assert_eq!(inventory.source.max_prefetch_records, 2000);
    let Target::Postgres(table) = &inventory.target else { panic!("postgres target") };
    assert_eq!(table.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["store_id", "item_id", "on_hand"]);
    assert_eq!(inventory.key.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["store_id", "item_id"]);
    assert_eq!(inventory.events[1].op.kind, OpKind::Decrement);

    let profiles = &settings.connectors[1];
    let Target::Elasticsearch(index) = &profiles.target else { panic!("elasticsearch target") };
    assert_eq!(index.alias, "user-profiles");
    assert_eq!(index.max_bulk_bytes, 5 << 20);
    assert_eq!(profiles.events[1].op.fields[0].1.to_string(), "lower(new_email)");

    let SinkConnection::Postgres(readdb) = &settings.sinks["readdb"] else { panic!("postgres sink") };
    assert!(!format!("{readdb:?}").contains("hunter2"), "passwords are never printed");
}

#[test]
fn unknown_fields_are_reported_everywhere() {
    let daemon = DAEMON.replace("schema_registry:", "kafak: {}\nschema_registry:");
    let inventory =
        INVENTORY.replace("batch:", "bacth: {}\nbatch:").replace("table: inventory", "table: inventory\n  tabel: x");
    let project = Project::new(&daemon, &[("inventory.yaml", &inventory)]);
    let problems = project.problems();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems[0].starts_with("kawka.yaml:3 kafak: unknown field `kafak`"), "{problems:#?}");
    assert!(problems[1].starts_with("inventory.yaml:6 sink.tabel: unknown field `tabel`"), "{problems:#?}");
    assert!(problems[2].starts_with("inventory.yaml:10 bacth: unknown field `bacth`"), "{problems:#?}");
}

#[test]
fn bad_types_are_reported() {
    let inventory = INVENTORY
        .replace("max_events: 1000", "max_events: lots")
        .replace("topics: [shipments, sales]", "topics: { a: b }")
        .replace("on_hand: bigint", "on_hand: money");
    let project = Project::new(DAEMON, &[("inventory.yaml", &inventory)]);
    assert_eq!(
        project.problems(),
        vec![
            "inventory.yaml:2 source.topics: expected a list, found a mapping",
            "inventory.yaml:9 batch.max_events: expected a non-negative integer, found `lots`",
        ]
    );
    // Once the shapes are right, validation finds the unknown column type.
    let inventory = INVENTORY.replace("on_hand: bigint", "on_hand: money");
    let problems = Project::new(DAEMON, &[("inventory.yaml", &inventory)]).problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("inventory.yaml:6 sink.columns.on_hand: unknown column type `money`"),
        "{problems:#?}"
    );
}

#[test]
fn batch_sizes_and_waits_that_would_overflow_are_errors_with_their_lines() {
    for (was, setting, field) in [
        ("max_events: 1000", "max_events: 18446744073709551615", "batch.max_events"),
        ("max_events: 1000", "max_events: 0", "batch.max_events"),
        ("max_wait: 50ms", "max_wait: 99999999999999999999s", "batch.max_wait"),
    ] {
        let inventory = INVENTORY.replace(was, setting);
        let problems = Project::new(DAEMON, &[("inventory.yaml", &inventory)]).problems();
        assert_eq!(problems.len(), 1, "{setting}: {problems:?}");
        assert!(problems[0].starts_with(&format!("inventory.yaml:9 {field}:")), "{setting}: {problems:?}");
    }
}

#[test]
fn a_fillfactor_out_of_range_names_its_line() {
    let inventory = INVENTORY
        .replace("  primary_key: [store_id, item_id]\n", "  primary_key: [store_id, item_id]\n  fillfactor: 5\n");
    let problems = Project::new(DAEMON, &[("inventory.yaml", &inventory)]).problems();
    assert_eq!(problems, vec!["inventory.yaml:8 sink.fillfactor: 5 is not a fillfactor (10 to 100)"]);
    let inventory = INVENTORY
        .replace("  primary_key: [store_id, item_id]\n", "  primary_key: [store_id, item_id]\n  fillfactor: 70\n");
    let settings = Project::new(DAEMON, &[("inventory.yaml", &inventory)]).load().expect("70 is a fillfactor");
    let Target::Postgres(target) = &settings.connectors[0].target else { panic!("a postgres target") };
    assert_eq!(target.fillfactor, Some(70));
}

#[test]
fn missing_sink_name_is_reported() {
    let inventory = INVENTORY.replace("to: readdb", "to: warehouse");
    let problems = Project::new(DAEMON, &[("inventory.yaml", &inventory)]).problems();
    assert_eq!(
        problems,
        vec!["inventory.yaml:4 sink.to: no sink named `warehouse` in the daemon config (known: readdb, search)"]
    );
}

#[test]
fn duplicate_connector_names_are_reported() {
    let problems =
        Project::new(DAEMON, &[("a.yaml", INVENTORY), ("b.yaml", INVENTORY), ("c.yaml", PROFILES)]).problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].starts_with("b.yaml:1 name: connector `inventory` is already defined in "), "{problems:#?}");
    assert!(problems[0].ends_with("a.yaml"), "{problems:#?}");
}

#[test]
fn bad_durations_and_sizes_are_reported() {
    let inventory =
        INVENTORY.replace("max_wait: 50ms", "max_wait: 5 fortnights").replace("max_bytes: 1MiB", "max_bytes: big");
    let problems = Project::new(DAEMON, &[("inventory.yaml", &inventory)]).problems();
    assert_eq!(
        problems,
        vec![
            "inventory.yaml:9 batch.max_bytes: `big` is not a size (examples: 512KiB, 5MiB, 1GiB)",
            "inventory.yaml:9 batch.max_wait: `5 fortnights` is not a duration (examples: 250ms, 5s, 2m, 1h)",
        ]
    );
}

#[test]
fn every_problem_of_every_file_at_once() {
    let daemon = DAEMON.replace("http://127.0.0.1:8081", "127.0.0.1:8081");
    let inventory = INVENTORY
        .replace("on_hand: quantity } }\n  com", "in_hand: quantity } }\n  com")
        .replace("{ decrement: { on_hand: quantity } }", "{ decrement: { on_hand: lowercase(quantity) } }");
    let profiles = PROFILES.replace("on_error: dead_letter", "on_error: shrug");
    let problems =
        Project::new(&daemon, &[("inventory.yaml", &inventory), ("user-profiles.yaml", &profiles)]).problems();
    let expected = [
        "user-profiles.yaml:5 on_error: unknown value `shrug`",
        "kawka.yaml:4 schema_registry.url: `127.0.0.1:8081` is not an http(s) URL",
        "inventory.yaml:11 events.com.example.retail.ShipmentReceived.increment.in_hand: `in_hand` is not a column of `inventory`",
        "inventory.yaml:12 events.com.example.retail.ItemSold.decrement.on_hand: unknown function `lowercase`",
    ];
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    for (problem, expected) in problems.iter().zip(expected) {
        assert!(problem.starts_with(expected), "{problem} should start with {expected}");
    }
}

#[test]
fn target_fields_must_fit_the_sink_type() {
    let profiles = PROFILES.replace("index: user-profiles", "index: user-profiles, table: profiles");
    let inventory = INVENTORY.replace("to: readdb", "to: search");
    let problems =
        Project::new(DAEMON, &[("inventory.yaml", &inventory), ("user-profiles.yaml", &profiles)]).problems();
    assert!(problems.iter().any(|p| p.contains("sink.table: `table` is for postgres sinks")), "{problems:#?}");
    assert!(problems.iter().any(|p| p.contains("sink.index: an elasticsearch sink needs `index`")), "{problems:#?}");
}

#[test]
fn unset_variables_and_syntax_errors_have_lines() {
    let daemon = DAEMON.replace("http://127.0.0.1:8081", "${REGISTRY_URL}");
    let inventory = INVENTORY.replace("key: {", "key: [");
    let problems = Project::new(&daemon, &[("inventory.yaml", &inventory)]).problems();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].starts_with("kawka.yaml:4 : environment variable `REGISTRY_URL` is not set"), "{problems:#?}");
    assert!(problems[1].starts_with("inventory.yaml:8 : not valid YAML"), "{problems:#?}");
}

#[test]
fn a_huge_config_file_is_refused_unread_and_an_alias_bomb_unexpanded() {
    // 5 MiB of comments after a valid connector: refused before parsing.
    let huge = format!("{INVENTORY}{}", "# padding padding padding padding padding padding padding\n".repeat(90_000));
    let problems = Project::new(DAEMON, &[("inventory.yaml", &huge), ("user-profiles.yaml", PROFILES)]).problems();
    assert_eq!(problems, vec!["inventory.yaml:1 : larger than 4 MiB: not read"], "{problems:#?}");
    let bomb = format!(
        "{INVENTORY}x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n{}",
        (1..9).map(|i| format!("x{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 10].join(", "))).collect::<String>()
    );
    let problems = Project::new(DAEMON, &[("inventory.yaml", &bomb)]).problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].starts_with("inventory.yaml:") && problems[0].contains("alias bomb"), "{problems:#?}");
}

#[test]
fn park_settings_are_checked_and_need_on_error_park() {
    let parks =
        PROFILES.replace("on_error: dead_letter", "on_error: park\npark: { max_keys: 50, fallback: dead_letter }");
    let settings = Project::new(DAEMON, &[("user-profiles.yaml", &parks)]).load().expect("valid");
    let profiles = &settings.connectors[0];
    assert_eq!(profiles.on_error, ErrorPolicy::Park);
    assert_eq!(profiles.park, ParkSettings { max_keys: 50, fallback: ParkFallback::DeadLetter });
    assert!(profiles.sink_settings().parks, "the sink prepares the parked keys' store");
    let defaults = PROFILES.replace("on_error: dead_letter", "on_error: park");
    let settings = Project::new(DAEMON, &[("user-profiles.yaml", &defaults)]).load().expect("valid");
    assert_eq!(settings.connectors[0].park, ParkSettings { max_keys: 10_000, fallback: ParkFallback::Stop });

    let stray = PROFILES.replace("tombstones: delete", "tombstones: delete\npark: { max_keys: 5 }");
    let problems = Project::new(DAEMON, &[("user-profiles.yaml", &stray)]).problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].starts_with("user-profiles.yaml:8 park: applies only with `on_error: park`"), "{problems:#?}");
    let zero = parks.replace("max_keys: 50", "max_keys: 0").replace("fallback: dead_letter", "fallback: shrug");
    let problems = Project::new(DAEMON, &[("user-profiles.yaml", &zero)]).problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("park.fallback: unknown variant `shrug`")
                || p.contains("fallback: unknown value `shrug`")),
        "{problems:#?}"
    );
    let many = parks.replace("max_keys: 50", "max_keys: 20000");
    let problems = Project::new(DAEMON, &[("user-profiles.yaml", &many)]).problems();
    assert!(problems.iter().any(|p| p.contains("park.max_keys: must be 1 to 10000")), "{problems:#?}");
}
