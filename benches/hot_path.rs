//! The hot path, stage by stage: framing + Avro decode, the upcast chain,
//! projection, per-key compaction, Postgres parameter building and
//! Elasticsearch bulk encoding; and the whole in-process path, framed bytes
//! in, net ops out (`framed_to_net_ops`: one thread, so its events/s is per
//! core). `cargo bench --bench hot_path`; it also prints the heap
//! allocations per event of each path (a counting allocator wraps the
//! system's in this bench only).
//!
//! Events are ~10-field records (`bench.Order` v2; a share of them written
//! as v1 and upcast), keys drawn so that a batch touches each key ~5 times.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use apache_avro::types::Value as AvroValue;
use apache_avro::writer::datum::GenericDatumWriter;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use kawka::codec::avro::Decoder;
use kawka::codec::framing;
use kawka::config::{ConnectorSettings, Settings};
use kawka::event::{Event, Position};
use kawka::projection::fold::{fold, GroupBy};
use kawka::projection::{Projected, Projection, RulesProjection, WriteOp};
use kawka::sink::elasticsearch::bulk::{self, Tombstones};
use kawka::sink::postgres::{copy_rows, TableSql};
use kawka::sink::Target;
use kawka::upcast::Upcasting;
use kawka::value::{intern, Value};

const BATCH: usize = 5000;

/// The system allocator, counting allocations (of every thread: the
/// counted paths run alone).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations per event of one run of `path` over `events` events.
fn allocations_per_event(events: usize, path: impl FnOnce()) -> f64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    path();
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / events as f64
}

const V1: &str = r#"{"type":"record","name":"Order","namespace":"bench","fields":[
 {"name":"order_id","type":"string"},{"name":"customer","type":"string"},{"name":"store","type":"string"},
 {"name":"item","type":"string"},{"name":"quantity","type":"int"},{"name":"price_cents","type":"long"},
 {"name":"currency","type":"string"},{"name":"placed_at","type":"long"},{"name":"express","type":"boolean"}]}"#;
const V2: &str = r#"{"type":"record","name":"Order","namespace":"bench","fields":[
 {"name":"order_id","type":"string"},{"name":"customer_id","type":"string"},{"name":"store","type":"string"},
 {"name":"item","type":"string"},{"name":"quantity","type":"int"},{"name":"price_cents","type":"long"},
 {"name":"currency","type":"string"},{"name":"placed_at","type":"long"},{"name":"express","type":"boolean"},
 {"name":"channel","type":"string","default":"web"}]}"#;

/// A framed v2 Order (schema id 2).
fn order(writer: &GenericDatumWriter, n: usize) -> Vec<u8> {
    let text = |s: String| AvroValue::String(s);
    let record = AvroValue::Record(vec![
        ("order_id".into(), text(format!("order-{n:08}"))),
        ("customer_id".into(), text(format!("customer-{}", n % 1000))),
        ("store".into(), text(format!("store-{}", n % 17))),
        ("item".into(), text(format!("item-{}", n % 250))),
        ("quantity".into(), AvroValue::Int((n % 9 + 1) as i32)),
        ("price_cents".into(), AvroValue::Long(1999 + (n % 500) as i64)),
        ("currency".into(), text("EUR".into())),
        ("placed_at".into(), AvroValue::Long(1_700_000_000_000 + n as i64)),
        ("express".into(), AvroValue::Boolean(n % 3 == 0)),
        ("channel".into(), text("app".into())),
    ]);
    let body = writer.write_value_to_vec(record).expect("an order matches v2");
    let mut out = Vec::new();
    framing::frame_into(2, &body, &mut out);
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    settings: Settings,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let write = |path: &str, text: &str| {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    // Relative directories are relative to the working directory: name them in full.
    let config = format!(
        "kafka: {{ bootstrap_servers: 127.0.0.1:9092 }}\nschema_registry: {{ url: http://127.0.0.1:8081 }}\n\
         sinks:\n  db: {{ type: postgres, url: postgres://localhost/db }}\n  es: {{ type: elasticsearch, url: http://127.0.0.1:9200 }}\n\
         connectors: {0}/connectors/\nschemas: {0}/schemas/\n",
        root.display()
    );
    write("config/kawka.yaml", &config);
    write(
        "connectors/orders.yaml",
        "name: orders\nsource: { topics: [orders] }\nsink:\n  to: db\n  table: customer_orders\n  columns: { customer_id: text, store: text, item: text, quantity: bigint, spent_cents: bigint, currency: text, last_order: text, placed_at: timestamptz, express: boolean, channel: text }\n  primary_key: [customer_id]\n\
         key: { customer_id: customer_id }\nevents:\n  bench.Order: { merge: { store: store, item: item, currency: currency, last_order: order_id, placed_at: placed_at, express: express, channel: channel } }\n",
    );
    write(
        "connectors/order-search.yaml",
        "name: order-search\nsource: { topics: [orders] }\nsink: { to: es, index: orders }\nkey: $key\n\
         events:\n  bench.Order: { upsert: { customer: customer_id, store: store, item: item, quantity: quantity, price: price_cents, currency: currency, placed_at: placed_at, express: express, channel: channel } }\n",
    );
    write("schemas/bench.Order/v1.avsc", V1);
    write("schemas/bench.Order/v2.avsc", V2);
    write(
        "schemas/upcasters.yaml",
        "- event: bench.Order\n  from: 1\n  steps:\n    - rename: { customer: customer_id }\n    - add: { channel: web }\n",
    );
    let settings = kawka::config::load(&root.join("config/kawka.yaml")).expect("bench config is valid");
    Fixture { _dir: dir, settings }
}

/// `bench.Chain` v1 → v2 → v3 → v4, one declared upcaster per step
/// (rename + add, a move into a nested record, a remove and a map).
fn three_step_chain() -> (tempfile::TempDir, Upcasting) {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("schemas");
    let fields = |extra: &str| {
        format!(
            r#"{{"type":"record","name":"Chain","namespace":"bench","fields":[{{"name":"order_id","type":"string"}},{{"name":"store","type":"string"}},{{"name":"item","type":"string"}},{{"name":"quantity","type":"int"}},{{"name":"price_cents","type":"long"}},{{"name":"currency","type":"string"}},{{"name":"placed_at","type":"long"}},{{"name":"express","type":"boolean"}}{extra}]}}"#
        )
    };
    let versions = [
        fields(r#",{"name":"customer","type":"string"}"#),
        fields(r#",{"name":"customer_id","type":"string"},{"name":"channel","type":"string"}"#),
        fields(
            r#",{"name":"buyer","type":{"type":"record","name":"Buyer","fields":[{"name":"customer_id","type":"string"}]}},{"name":"channel","type":"string"}"#,
        ),
        fields(
            r#",{"name":"buyer","type":{"type":"record","name":"Buyer","fields":[{"name":"customer_id","type":"string"}]}}"#,
        ),
    ];
    std::fs::create_dir_all(root.join("bench.Chain")).expect("mkdir");
    for (n, schema) in versions.iter().enumerate() {
        std::fs::write(root.join(format!("bench.Chain/v{}.avsc", n + 1)), schema).expect("write");
    }
    std::fs::write(
        root.join("upcasters.yaml"),
        "- event: bench.Chain\n  from: 1\n  steps: [ { rename: { customer: customer_id } }, { add: { channel: web } } ]\n\
         - event: bench.Chain\n  from: 2\n  steps: [ { move: { from: customer_id, to: buyer.customer_id } }, { map: { currency: { EUR: EUR } } } ]\n\
         - event: bench.Chain\n  from: 3\n  steps: [ { remove: [channel] } ]\n",
    )
    .expect("write");
    let catalogue = kawka::upcast::catalogue::Catalogue::load(&root).expect("chain catalogue");
    let declared = kawka::upcast::steps::load(&root.join("upcasters.yaml")).expect("chain upcasters");
    for step in &declared {
        assert!(step.check(&catalogue).is_empty(), "{:?}", step.check(&catalogue));
    }
    let chain = declared.into_iter().map(|d| Arc::new(d) as Arc<dyn kawka::upcast::Upcaster>).collect();
    (dir, Upcasting::new(Arc::new(catalogue), chain))
}

fn connector<'a>(settings: &'a Settings, name: &str) -> &'a ConnectorSettings {
    settings.connectors.iter().find(|c| c.name == name).expect("connector")
}

/// The `n`th framed record decoded into a v2 event (what the source and
/// codec hand the pipeline), with `key`.
fn framed_event(decoder: &Decoder, n: usize, bytes: &[u8], key: Value) -> Event {
    let frame = framing::parse(bytes).expect("framed");
    let (event_type, payload) = decoder.decode(frame.body).expect("decodes");
    Event {
        event_type,
        version: 2,
        payload,
        key,
        position: Position { topic: "orders", partition: 0, offset: n as i64 },
        timestamp: Some(1_700_000_000_000),
    }
}

fn decoded(decoder: &Decoder, framed: &[Vec<u8>]) -> Vec<Event> {
    framed
        .iter()
        .enumerate()
        .map(|(n, bytes)| framed_event(decoder, n, bytes, Value::from(format!("customer-{}", n % 1000))))
        .collect()
}

fn benches(c: &mut Criterion) {
    let fixture = fixture();
    let settings = &fixture.settings;
    let schema = apache_avro::Schema::parse_str(V2).expect("schema");
    let decoder = Decoder::compile(&schema, &[]).expect("decoder");
    let writer = GenericDatumWriter::builder(&schema).build().expect("a v2 writer");
    let framed: Vec<Vec<u8>> = (0..BATCH).map(|n| order(&writer, n)).collect();
    let upcasting: Arc<Upcasting> = kawka::app::Builder::new().upcasting(settings);
    let projection = RulesProjection::new(&connector(settings, "orders").projection_settings());
    let events = decoded(&decoder, &framed);
    let ops: Vec<WriteOp> = events
        .iter()
        .flat_map(|e| match projection.project(e).expect("projects") {
            Projected::Ops(ops) => ops,
            Projected::Skipped => Vec::new(),
        })
        .collect();

    let mut group = c.benchmark_group("hot_path");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.bench_function("framing_and_decode", |b| {
        b.iter(|| {
            for bytes in &framed {
                let frame = framing::parse(bytes).expect("framed");
                black_box(decoder.decode(frame.body).expect("decodes"));
            }
        })
    });
    // What the pipeline decodes of events that reach the projection as
    // written (no upcast): only the fields the connector reads.
    let read = projection.fields_read(decoder.type_name()).expect("a rules projection knows what it reads");
    let fields = decoder.record_fields().expect("a record at the top");
    let mask: Vec<bool> = fields.iter().map(|field| read.contains(field)).collect();
    println!("the orders connector reads {} of the {} fields of {}", read.len(), fields.len(), decoder.type_name());
    group.bench_function("framing_and_decode_fields_read", |b| {
        b.iter(|| {
            for bytes in &framed {
                let frame = framing::parse(bytes).expect("framed");
                black_box(decoder.decode_fields(frame.body, &mask).expect("decodes"));
            }
        })
    });
    // v1 events: one declared upcaster step each.
    let v1_events: Vec<Event> = events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.version = 1;
            if let Some(record) = e.payload.as_record_mut() {
                record.rename("customer_id", intern("customer"));
                record.remove("channel");
            }
            e
        })
        .collect();
    group.bench_function("upcast_v1_to_v2", |b| {
        b.iter_batched(
            || v1_events.clone(),
            |events| {
                for event in events {
                    black_box(upcasting.to_newest(event).expect("upcasts"));
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("project", |b| {
        b.iter(|| {
            for event in &events {
                black_box(projection.project(event).expect("projects"));
            }
        })
    });
    group.bench_function("decode_upcast_project", |b| {
        b.iter(|| {
            for (n, bytes) in framed.iter().enumerate() {
                let event = framed_event(&decoder, n, bytes, Value::Null);
                for event in upcasting.to_newest(event).expect("upcasts") {
                    black_box(projection.project_owned(event).expect("projects"));
                }
            }
        })
    });
    // Framed bytes in, net ops out: decode, upcast, project, fold; what a
    // connector's thread does for a batch before the sink writes it.
    let whole_path = || {
        let mut ops = Vec::with_capacity(BATCH);
        for (n, bytes) in framed.iter().enumerate() {
            let event = framed_event(&decoder, n, bytes, Value::Null);
            // As the pipeline gathers them: a chunk's ops in one vector.
            for event in upcasting.to_newest(event).expect("upcasts") {
                projection.project_into(event, &mut ops).expect("projects");
            }
        }
        black_box(fold(&ops, &[], GroupBy::Key).net.len())
    };
    group.bench_function("framed_to_net_ops", |b| b.iter(whole_path));
    // The same, for events whose rule reads plain fields: decoded straight
    // into their op (what the decode thread does with them), then folded.
    let plan = projection.direct(decoder.type_name(), &fields);
    let straight_path = |slots: &mut Vec<Value>| {
        let plan = plan.as_ref().expect("a plan");
        let mut ops = Vec::with_capacity(BATCH);
        for (n, bytes) in framed.iter().enumerate() {
            let frame = framing::parse(bytes).expect("framed");
            assert!(decoder.decode_slots(frame.body, plan.slot_of(), slots), "decodes");
            let position = Position { topic: "orders", partition: 0, offset: n as i64 };
            ops.push(plan.op(slots, &Value::Null, position, Some(1_700_000_000_000)).expect("an op"));
        }
        black_box(fold(&ops, &[], GroupBy::Key).net.len())
    };
    let mut slots = vec![Value::Null; plan.as_ref().map_or(0, |plan| plan.slots())];
    match &plan {
        Some(_) => group.bench_function("framed_straight_to_net_ops", |b| b.iter(|| straight_path(&mut slots))),
        None => {
            println!("the orders connector's rule for {} is not decoded straight into its op", decoder.type_name());
            &mut group
        }
    };
    group.bench_function("compact", |b| b.iter(|| black_box(fold(&ops, &[], GroupBy::Key))));
    let Target::Postgres(target) = &connector(settings, "orders").target else { panic!("postgres target") };
    let table = TableSql::new(target, false);
    let net = fold(&ops, &[], GroupBy::Key).net;
    group.bench_function("postgres_parameters", |b| b.iter(|| black_box(table.plan(&net).expect("binds"))));
    // The text a COPY of new keys sends, from the planned arrays.
    let statements = table.plan(&net).expect("binds");
    group.bench_function("postgres_copy_text", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            for statement in &statements {
                if let Some(insert) = &statement.insert {
                    copy_rows(&statement.arrays, &insert.types, 0..statement.rows.len(), &mut out);
                }
            }
            black_box(out)
        })
    });
    // What the sink plans when it expects new keys: the COPY data straight
    // from the net ops, no arrays (against the two above together), as
    // text (a table of other types than declared) and in binary.
    group.bench_function("postgres_copy_from_ops", |b| {
        b.iter(|| black_box(table.plan_rendering(&net, &|_| true, false).expect("binds")))
    });
    group.bench_function("postgres_binary_copy_from_ops", |b| {
        b.iter(|| black_box(table.plan_rendering(&net, &|_| true, true).expect("binds")))
    });
    let search = RulesProjection::new(&connector(settings, "order-search").projection_settings());
    let search_ops: Vec<WriteOp> = events
        .iter()
        .flat_map(|e| match search.project(e).expect("projects") {
            Projected::Ops(ops) => ops,
            Projected::Skipped => Vec::new(),
        })
        .collect();
    group.bench_function("bulk_body", |b| {
        b.iter(|| {
            let tombstones = Tombstones { index: "orders.kawka-deleted", at_millis: 0 };
            black_box(bulk::plan(&search_ops, &[], "orders", tombstones, true).actions)
        })
    });
    let (_chain_dir, chain) = three_step_chain();
    let chain_v1: Vec<Event> = v1_events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.event_type = intern("bench.Chain");
            e
        })
        .collect();
    group.bench_function("upcast_3_step_chain_v1_to_v4", |b| {
        b.iter_batched(
            || chain_v1.clone(),
            |events| {
                for event in events {
                    black_box(chain.to_newest(event).expect("upcasts"));
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
    let decode_only = allocations_per_event(BATCH, || {
        for bytes in &framed {
            black_box(decoder.decode(framing::parse(bytes).expect("framed").body).expect("decodes"));
        }
    });
    let projected = allocations_per_event(BATCH, || {
        for event in &events {
            black_box(projection.project(event).expect("projects"));
        }
    });
    let whole = allocations_per_event(BATCH, || {
        whole_path();
    });
    let straight = match &plan {
        Some(_) => format!(
            "{:.2}",
            allocations_per_event(BATCH, || {
                straight_path(&mut slots);
            })
        ),
        None => "-".to_string(),
    };
    println!(
        "allocations per event: decode {decode_only:.2}, project {projected:.2}, \
         framed bytes to net ops (decode, upcast, project, fold) {whole:.2}, straight into the ops and folded {straight}"
    );
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
