//! A Postgres rebuild's cut-over keeps what users hung on the read model
//! (views, a materialized view, grants, a column grant, comments, a
//! row-level security policy, a trigger), never makes readers queue behind
//! it for longer than its lock timeout, and a rebuild killed while it
//! waits to cut over is resumed, not started again.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use sqlx::Executor as _;

use support::{eventually, Project};

fn shipment(n: usize) -> Json {
    let (store, item) = (format!("s{}", n % 20), format!("i{}", n % 50));
    json!({"schema": "received", "key": format!("{store}:{item}"), "value": {"shipment_id": format!("r{n}"),
        "store_id": store, "item_id": item, "quantity": (n % 5 + 1) as i64, "received_at": 0}})
}

fn fold(events: usize) -> i64 {
    (0..events).map(|n| (n % 5 + 1) as i64).sum()
}

struct Live {
    _registry: kawka_registry::RunningRegistry,
    project: Project,
    _daemon: support::Kawka,
    spec: Json,
    name: String,
    pool: sqlx::PgPool,
}

/// A live connector holding the fold of `events` shipments.
async fn live(events: usize) -> Live {
    let registry = support::start_registry().await;
    let topic = support::unique("cut_shipments");
    let name = support::unique("cut");
    support::create_topic(&topic, 2).await;
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "schemas": {"received": support::catalogue_schema("com.example.retail.ShipmentReceived", 1)}});
    support::produce_with_python(&spec, (0..events).map(shipment).collect()).await;
    let connector = format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_events: 500, max_wait: 50ms }}
events:
  com.example.retail.ShipmentReceived: {{ increment: {{ on_hand: quantity }} }}
"#
    );
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    let daemon = project.start(0);
    let pool = support::postgres().await;
    wait_for(&pool, &name, events).await;
    Live { _registry: registry, project, _daemon: daemon, spec, name, pool }
}

async fn wait_for(pool: &sqlx::PgPool, name: &str, events: usize) {
    eventually(Duration::from_secs(180), &format!("the live model to hold {events} events"), || async {
        (support::stored_positions(pool, name).await == events as i64).then_some(())
    })
    .await;
}

async fn scalar<T>(pool: &sqlx::PgPool, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// `kawka rebuild <name> [args]` in the project; stderr (the progress
/// lines) goes to a file the test can watch.
fn start_rebuild(project: &Project, name: &str, args: &[&str], log: &str) -> Child {
    let stderr = std::fs::File::create(project.root().join(log)).expect("log");
    Command::new(env!("CARGO_BIN_EXE_kawka"))
        .arg("rebuild")
        .arg(name)
        .args(args)
        .current_dir(project.root())
        .env_remove("KAWKA_CONFIG")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("kawka rebuild")
}

async fn finish(child: Child) -> (bool, String) {
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await.expect("thread").expect("wait");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_users_hung_on_the_table_moves_with_it_and_back() {
    const FIRST: usize = 3000;
    let live = live(FIRST).await;
    let (pool, name) = (&live.pool, live.name.clone());
    let role = format!("{name}_reader");
    let setup = format!(
        r#"
CREATE ROLE "{role}" NOLOGIN;
CREATE VIEW "{name}_view" AS SELECT store_id, item_id, on_hand FROM "{name}";
GRANT SELECT ON "{name}_view" TO "{role}";
CREATE VIEW "{name}_totals" WITH (security_barrier) AS SELECT store_id, sum(on_hand) AS total FROM "{name}_view" GROUP BY store_id;
CREATE MATERIALIZED VIEW "{name}_mv" AS SELECT store_id, sum(on_hand)::bigint AS total FROM "{name}" GROUP BY store_id;
CREATE UNIQUE INDEX "{name}_mv_store" ON "{name}_mv" (store_id);
GRANT SELECT ON "{name}_mv" TO "{role}";
COMMENT ON MATERIALIZED VIEW "{name}_mv" IS 'totals per store';
GRANT SELECT ON "{name}" TO "{role}";
GRANT UPDATE (on_hand) ON "{name}" TO "{role}";
COMMENT ON TABLE "{name}" IS 'inventory read model';
COMMENT ON COLUMN "{name}".on_hand IS 'units in the store';
ALTER TABLE "{name}" ENABLE ROW LEVEL SECURITY;
CREATE POLICY only_s1 ON "{name}" FOR SELECT TO "{role}" USING (store_id = 's1');
CREATE FUNCTION "{name}_touch"() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER "{name}_touched" BEFORE UPDATE ON "{name}" FOR EACH ROW EXECUTE FUNCTION "{name}_touch"();
"#
    );
    pool.execute(setup.as_str()).await.expect("what users hang on a read model");

    let check = |events: usize, when: &'static str| {
        let (pool, name, role) = (pool.clone(), name.clone(), role.clone());
        async move {
            let expected = fold(events);
            let table = format!("\"{name}\"");
            let view: i64 = scalar(&pool, &format!("SELECT sum(on_hand)::bigint FROM \"{name}_view\"")).await;
            assert_eq!(view, expected, "{when}: the view reads the live table");
            let totals: i64 = scalar(&pool, &format!("SELECT sum(total)::bigint FROM \"{name}_totals\"")).await;
            assert_eq!(totals, expected, "{when}: a view over the view too");
            let barrier: bool = scalar(
                &pool,
                &format!("SELECT 'security_barrier=true' = ANY(reloptions) FROM pg_class WHERE oid = '\"{name}_totals\"'::regclass"),
            )
            .await;
            assert!(barrier, "{when}: the view keeps its options");
            pool.execute(format!("REFRESH MATERIALIZED VIEW \"{name}_mv\"").as_str()).await.expect("refresh");
            let mv: i64 = scalar(&pool, &format!("SELECT sum(total)::bigint FROM \"{name}_mv\"")).await;
            assert_eq!(mv, expected, "{when}: the materialized view refreshes from the live table");
            for (sql, what) in [
                (format!("SELECT has_table_privilege('{role}', '{table}', 'SELECT')"), "the table grant"),
                (format!("SELECT has_column_privilege('{role}', '{table}', 'on_hand', 'UPDATE')"), "the column grant"),
                (format!("SELECT NOT has_table_privilege('{role}', '{table}', 'UPDATE')"), "no more than was granted"),
                (format!("SELECT has_table_privilege('{role}', '\"{name}_view\"', 'SELECT')"), "the view's grant"),
                (format!("SELECT has_table_privilege('{role}', '\"{name}_mv\"', 'SELECT')"), "the materialized view's grant"),
                (format!("SELECT obj_description('{table}'::regclass, 'pg_class') = 'inventory read model'"), "the comment"),
                (
                    format!("SELECT col_description('{table}'::regclass, 3) = 'units in the store'"),
                    "the column comment",
                ),
                (
                    format!("SELECT obj_description('\"{name}_mv\"'::regclass, 'pg_class') = 'totals per store'"),
                    "the materialized view's comment",
                ),
                (format!("SELECT relrowsecurity FROM pg_class WHERE oid = '{table}'::regclass"), "row-level security"),
                (
                    format!("SELECT count(*) = 1 FROM pg_policy WHERE polrelid = '{table}'::regclass AND polname = 'only_s1'"),
                    "the policy",
                ),
                (
                    format!(
                        "SELECT count(*) = 1 FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND tgname = '{name}_touched'"
                    ),
                    "the trigger",
                ),
                (
                    format!("SELECT count(*) = 1 FROM pg_indexes WHERE indexname = '{name}_mv_store'"),
                    "the materialized view's index",
                ),
            ] {
                let holds: bool = scalar(&pool, &sql).await;
                assert!(holds, "{when}: {what} ({sql})");
            }
            // The role reads the live table, filtered by its policy.
            let mut connection = pool.acquire().await.expect("connection");
            connection.execute("BEGIN").await.expect("begin");
            connection.execute(format!("SET LOCAL ROLE \"{role}\"").as_str()).await.expect("set role");
            let seen: Vec<String> = sqlx::query_scalar(&format!("SELECT DISTINCT store_id FROM {table}"))
                .fetch_all(&mut *connection)
                .await
                .unwrap_or_else(|e| panic!("{when}: the role reads the table: {e}"));
            assert_eq!(seen, vec!["s1".to_string()], "{when}: the policy filters");
            let through_view: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{name}_view\""))
                .fetch_one(&mut *connection)
                .await
                .unwrap_or_else(|e| panic!("{when}: the role reads the view: {e}"));
            assert_eq!(through_view, 100, "{when}");
            connection.execute("ROLLBACK").await.expect("rollback");
        }
    };
    check(FIRST, "before").await;

    // Rebuild while events keep coming.
    let producer = {
        let spec = live.spec.clone();
        tokio::spawn(async move {
            for chunk in (FIRST..FIRST + 1000).collect::<Vec<_>>().chunks(250) {
                support::produce_with_python(&spec, chunk.iter().map(|&n| shipment(n)).collect()).await;
            }
        })
    };
    let (ok, stdout) = finish(start_rebuild(&live.project, &name, &[], "rebuild.log")).await;
    let log = std::fs::read_to_string(live.project.root().join("rebuild.log")).unwrap_or_default();
    assert!(ok, "{stdout}\n{log}");
    producer.await.expect("producer");
    support::produce_with_python(&live.spec, (FIRST + 1000..FIRST + 1200).map(shipment).collect()).await;
    wait_for(pool, &name, FIRST + 1200).await;
    check(FIRST + 1200, "after the cut-over").await;
    let previous: i64 = scalar(pool, &format!("SELECT count(*) FROM \"{name}_v1\"")).await;
    assert_eq!(previous, 100, "the previous version is kept");

    let (ok, stdout) = finish(start_rebuild(&live.project, &name, &["--rollback"], "rollback.log")).await;
    assert!(ok, "{stdout}");
    support::produce_with_python(&live.spec, (FIRST + 1200..FIRST + 1300).map(shipment).collect()).await;
    wait_for(pool, &name, FIRST + 1300).await;
    check(FIRST + 1300, "after the rollback").await;

    let cleanup = format!(
        r#"DROP MATERIALIZED VIEW "{name}_mv"; DROP VIEW "{name}_totals"; DROP VIEW "{name}_view";
           DROP OWNED BY "{role}"; DROP ROLE "{role}";"#
    );
    pool.execute(cleanup.as_str()).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reader_stalls_no_one_and_a_killed_cut_over_resumes() {
    const FIRST: usize = 3000;
    let live = live(FIRST).await;
    let (pool, name) = (live.pool.clone(), live.name.clone());

    // A report holding the live table for as long as the test says.
    let mut long_reader = pool.acquire().await.expect("connection").detach();
    long_reader.execute("BEGIN").await.expect("begin");
    let _: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{name}\""))
        .fetch_one(&mut long_reader)
        .await
        .expect("long read");

    // Other readers, timed, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let readers = {
        let (pool, stop, name) = (pool.clone(), stop.clone(), name.clone());
        tokio::spawn(async move {
            let (mut worst, mut reads, mut errors) = (Duration::ZERO, 0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                if let Err(error) =
                    sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM \"{name}\"")).fetch_one(&pool).await
                {
                    errors.push(error.to_string());
                }
                worst = worst.max(started.elapsed());
                reads += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (worst, reads, errors)
        })
    };
    let producer = {
        let spec = live.spec.clone();
        tokio::spawn(async move {
            for chunk in (FIRST..FIRST + 600).collect::<Vec<_>>().chunks(100) {
                support::produce_with_python(&spec, chunk.iter().map(|&n| shipment(n)).collect()).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let cutting_over = |log: &'static str| {
        let path = live.project.root().join(log);
        async move {
            eventually(Duration::from_secs(180), "the rebuild to wait for the long reader", || async {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                text.contains("cutting over: waiting for").then_some(text)
            })
            .await
        }
    };

    // The first rebuild catches up, waits to cut over, and is killed.
    let mut first = start_rebuild(&live.project, &name, &[], "first.log");
    let waiting = cutting_over("first.log").await;
    assert!(waiting.contains("session(s) using") && waiting.contains(&name), "{waiting}");
    first.kill().expect("kill -9");
    let _ = first.wait();
    let built: i64 = scalar(&pool, &format!("SELECT '\"{name}_v2\"'::regclass::oid::int8")).await;

    // The second resumes it, waits too, and cuts over once the report ends.
    let second = start_rebuild(&live.project, &name, &[], "second.log");
    cutting_over("second.log").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    long_reader.execute("COMMIT").await.expect("the report ends");
    let (ok, stdout) = finish(second).await;
    let log = std::fs::read_to_string(live.project.root().join("second.log")).unwrap_or_default();
    assert!(ok, "{stdout}\n{log}");
    producer.await.expect("producer");
    wait_for(&pool, &name, FIRST + 600).await;
    stop.store(true, Ordering::SeqCst);
    let (worst, reads, errors) = readers.await.expect("readers");
    println!("readers during the cut-over: {reads} reads, the slowest {worst:?}");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(reads > 50, "{reads}");
    assert!(
        worst < Duration::from_secs(3),
        "no reader waits much longer than the 2 s lock timeout: the slowest took {worst:?}"
    );
    let live_oid: i64 = scalar(&pool, &format!("SELECT '\"{name}\"'::regclass::oid::int8")).await;
    assert_eq!(live_oid, built, "the killed rebuild's table was resumed, not built again");
    let total: i64 = scalar(&pool, &format!("SELECT sum(on_hand)::bigint FROM \"{name}\"")).await;
    assert_eq!(total, fold(FIRST + 600), "the fold of the whole log, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_in_a_publication_is_not_swapped() {
    let live = live(200).await;
    let (pool, name) = (&live.pool, &live.name);
    pool.execute(format!("CREATE PUBLICATION \"{name}_pub\" FOR TABLE \"{name}\"").as_str())
        .await
        .expect("publication");
    let (ok, stdout) = finish(start_rebuild(&live.project, name, &[], "rebuild.log")).await;
    let log = std::fs::read_to_string(live.project.root().join("rebuild.log")).unwrap_or_default();
    assert!(!ok, "{stdout}");
    assert!(log.contains(&format!("{name}_pub")) && log.contains("subscribers"), "{log}");
    let exists: bool = scalar(pool, &format!("SELECT to_regclass('\"{name}_v2\"') IS NOT NULL")).await;
    assert!(!exists, "nothing was built");
    pool.execute(format!("DROP PUBLICATION \"{name}_pub\"").as_str()).await.expect("drop publication");
}
