//! Random and mutated input to the decoders and the config loader: never a
//! panic, never an allocation beyond a bound of the input's size, always a
//! classified error. Seeded, so a failure names the seed that reproduces it
//! (`KAWKA_HOSTILE_SEED`); `KAWKA_HOSTILE_CASES` runs more cases.
//!
//! No services: pure functions of bytes and files.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use kawka::codec::avro::Decoder;
use kawka::codec::framing;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Counts, per thread, the bytes a call allocates at its peak: what one
/// hostile record may cost in memory.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|live| {
            live.set(live.get() + layout.size());
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
        });
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(layout.size())));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning its result and the most bytes it held at once.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    let result = f();
    (result, PEAK.with(Cell::get).saturating_sub(base))
}

fn cases() -> usize {
    std::env::var("KAWKA_HOSTILE_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(3000)
}

fn seed() -> u64 {
    std::env::var("KAWKA_HOSTILE_SEED").ok().and_then(|n| n.parse().ok()).unwrap_or(0x6b61776b61)
}

/// Schemas with every kind of Avro type, nested, recursive and logical.
fn schemas() -> Vec<Schema> {
    let texts = [
        r#"{"type":"record","name":"Flat","fields":[
            {"name":"s","type":"string"},{"name":"i","type":"int"},{"name":"l","type":"long"},
            {"name":"f","type":"float"},{"name":"d","type":"double"},{"name":"b","type":"boolean"},
            {"name":"y","type":"bytes"},{"name":"n","type":"null"}]}"#,
        r#"{"type":"record","name":"Nested","fields":[
            {"name":"tags","type":{"type":"array","items":"string"}},
            {"name":"props","type":{"type":"map","values":{"type":"array","items":"long"}}},
            {"name":"choice","type":["null","string","int",{"type":"array","items":"int"}]},
            {"name":"kind","type":{"type":"enum","name":"Kind","symbols":["A","B","C"]}},
            {"name":"hash","type":{"type":"fixed","name":"Hash","size":16}},
            {"name":"items","type":{"type":"array","items":{"type":"record","name":"Item",
                "fields":[{"name":"id","type":"string"},{"name":"q","type":"int"}]}}}]}"#,
        r#"{"type":"record","name":"Node","fields":[
            {"name":"value","type":"long"},{"name":"next","type":["null","Node"]}]}"#,
        r#"{"type":"record","name":"Logical","fields":[
            {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"us","type":{"type":"long","logicalType":"timestamp-micros"}},
            {"name":"day","type":{"type":"int","logicalType":"date"}},
            {"name":"id","type":{"type":"string","logicalType":"uuid"}},
            {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}},
            {"name":"money","type":{"type":"fixed","name":"M","size":8,"logicalType":"decimal","precision":18,"scale":4}}]}"#,
        r#"["null",{"type":"record","name":"A","fields":[{"name":"a","type":"string"}]},
            {"type":"record","name":"B","fields":[{"name":"b","type":{"type":"map","values":"bytes"}}]}]"#,
    ];
    texts.iter().map(|text| Schema::parse_str(text).expect("a test schema")).collect()
}

/// A valid value of `schema`, random but small, for mutating.
fn valid(schema: &Schema, root: &Schema, rng: &mut StdRng, depth: usize) -> AvroValue {
    match schema {
        Schema::Null => AvroValue::Null,
        Schema::Boolean => AvroValue::Boolean(rng.random()),
        Schema::Int => AvroValue::Int(rng.random()),
        Schema::Long => AvroValue::Long(rng.random()),
        Schema::Float => AvroValue::Float(rng.random()),
        Schema::Double => AvroValue::Double(rng.random()),
        Schema::String => AvroValue::String((0..rng.random_range(0..12)).map(|_| rng.random::<char>()).collect()),
        Schema::Bytes => AvroValue::Bytes((0..rng.random_range(0..12)).map(|_| rng.random()).collect()),
        Schema::Uuid(_) => AvroValue::Uuid(uuid_of(rng.random())),
        Schema::Date => AvroValue::Date(rng.random_range(-1_000_000..1_000_000)),
        Schema::TimestampMillis => AvroValue::TimestampMillis(rng.random_range(-10i64.pow(14)..10i64.pow(14))),
        Schema::TimestampMicros => AvroValue::TimestampMicros(rng.random_range(-10i64.pow(17)..10i64.pow(17))),
        Schema::Decimal(decimal) => {
            let bytes: Vec<u8> = match &decimal.inner {
                // Small magnitudes, within the declared precision.
                apache_avro::schema::InnerDecimalSchema::Fixed(fixed) => {
                    let mut bytes = vec![0u8; fixed.size];
                    bytes[fixed.size - 1] = rng.random();
                    bytes
                }
                apache_avro::schema::InnerDecimalSchema::Bytes => {
                    (0..rng.random_range(1..4)).map(|_| rng.random::<u8>() & 0x7f).collect()
                }
            };
            AvroValue::Decimal(apache_avro::Decimal::from(bytes))
        }
        Schema::Array(array) => {
            let n = if depth > 3 { 0 } else { rng.random_range(0..4) };
            AvroValue::Array((0..n).map(|_| valid(&array.items, root, rng, depth + 1)).collect())
        }
        Schema::Map(map) => {
            let n = if depth > 3 { 0 } else { rng.random_range(0..4) };
            AvroValue::Map((0..n).map(|i| (format!("k{i}"), valid(&map.types, root, rng, depth + 1))).collect())
        }
        Schema::Union(union) => {
            let variants = union.variants();
            // Deep down, the first branch (null in the recursive schema) ends the recursion.
            let index = if depth > 3 { 0 } else { rng.random_range(0..variants.len()) };
            AvroValue::Union(index as u32, Box::new(valid(&variants[index], root, rng, depth + 1)))
        }
        Schema::Record(record) => AvroValue::Record(
            record
                .fields
                .iter()
                .map(|field| (field.name.clone(), valid(&field.schema, root, rng, depth + 1)))
                .collect(),
        ),
        Schema::Enum(e) => {
            let index = rng.random_range(0..e.symbols.len());
            AvroValue::Enum(index as u32, e.symbols[index].clone())
        }
        Schema::Fixed(fixed) => AvroValue::Fixed(fixed.size, (0..fixed.size).map(|_| rng.random()).collect()),
        // The recursive schema's reference to itself.
        Schema::Ref { .. } => valid(root, root, rng, depth + 1),
        other => panic!("no generator for {other:?}"),
    }
}

/// The Avro binary of `value`.
fn encode(schema: &Schema, value: AvroValue) -> Vec<u8> {
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .and_then(|writer| writer.write_value_to_vec(value.clone()))
        .unwrap_or_else(|e| panic!("{value:?} encodes as {schema:?}: {e}"))
}

fn uuid_of(bits: u128) -> apache_avro::Uuid {
    apache_avro::Uuid::from_u128(bits)
}

/// Zig-zag varint of `n`: how Avro writes lengths and counts.
fn varint(n: i64) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// `bytes` changed at random: flips, cuts, insertions of huge lengths and
/// counts (the classic over-allocation), duplications.
fn mutate(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..rng.random_range(1..4) {
        let at = if out.is_empty() { 0 } else { rng.random_range(0..=out.len()) };
        match rng.random_range(0..6) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 => out.truncate(at),
            2 => {
                let huge = [i64::MAX, i64::MIN, 1 << 40, -(1 << 40), i32::MAX as i64, -1, 1 << 62];
                let n = huge[rng.random_range(0..huge.len())];
                out.splice(at..at, varint(n));
            }
            3 => {
                let n = rng.random_range(0..16);
                out.splice(at..at, (0..n).map(|_| rng.random::<u8>()));
            }
            4 if !out.is_empty() => {
                let from = rng.random_range(0..out.len());
                let piece: Vec<u8> = out[from..].iter().take(32).copied().collect();
                out.splice(at..at, piece);
            }
            _ => out.splice(at..at, [0xff; 11]).for_each(drop),
        }
    }
    out
}

/// The most a record of `len` bytes may make the decoder hold at once.
fn allowed(len: usize) -> usize {
    64 * len + (1 << 20)
}

#[test]
fn the_avro_decoder_never_panics_nor_over_allocates_on_hostile_bodies() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut errors = 0;
    let mut decoded = 0;
    for schema in schemas() {
        let decoder = Decoder::compile(&schema, &[]).expect("the schema compiles");
        for case in 0..cases() {
            let value = valid(&schema, &schema, &mut rng, 0);
            let good = encode(&schema, value);
            let input = match case % 4 {
                // A valid body decodes.
                0 => good.clone(),
                1 | 2 => mutate(&good, &mut rng),
                _ => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
            };
            let (outcome, peak) = peak_of(|| catch_unwind(AssertUnwindSafe(|| decoder.decode(&input))));
            let Ok(result) = outcome else {
                panic!("seed {} case {case}: the decoder panicked on {input:02x?} ({schema:?})", seed())
            };
            assert!(
                peak <= allowed(input.len()),
                "seed {} case {case}: {peak} bytes held decoding {} bytes",
                seed(),
                input.len()
            );
            match result {
                Ok(_) => decoded += 1,
                // Every decode error is the event's own: permanent.
                Err(error) => {
                    assert!(!error.to_string().is_empty());
                    let error = kawka::codec::CodecError::Avro { schema_id: 1, error };
                    assert_eq!(error.class(), kawka::error::ErrorClass::Permanent, "{error}");
                    errors += 1;
                }
            }
            if case % 4 == 0 {
                assert!(decoder.decode(&good).is_ok(), "seed {} case {case}: a valid body fails", seed());
            }
        }
    }
    eprintln!("{decoded} decoded, {errors} refused");
    assert!(decoded > 0 && errors > 0, "the cases must exercise both outcomes");
}

#[test]
fn huge_lengths_and_counts_are_refused_before_allocating() {
    let schema = &schemas()[1];
    let decoder = Decoder::compile(schema, &[]).expect("compiles");
    // An array claiming 2^40 strings, a map claiming i64::MAX entries, a
    // string claiming 2^62 bytes: each a few bytes long.
    for body in [varint(1 << 40), [varint(0), varint(i64::MAX)].concat(), [varint(1), varint(1 << 62)].concat()] {
        let (result, peak) = peak_of(|| decoder.decode(&body));
        assert!(result.is_err(), "{body:02x?} decodes");
        assert!(peak <= allowed(body.len()), "{peak} bytes held for {} bytes of input", body.len());
    }
}

#[test]
fn framing_never_panics_and_refuses_what_is_not_a_frame() {
    let mut rng = StdRng::seed_from_u64(seed());
    for case in 0..cases() * 4 {
        let bytes: Vec<u8> = (0..rng.random_range(0..12)).map(|_| rng.random()).collect();
        let parsed = catch_unwind(|| framing::parse(&bytes).map(|f| (f.schema_id, f.body.len())));
        let Ok(parsed) = parsed else { panic!("seed {} case {case}: framing panicked on {bytes:02x?}", seed()) };
        match parsed {
            Ok((id, body)) => {
                assert!(bytes.len() >= 5 && bytes[0] == 0, "{bytes:02x?} is no frame");
                assert_eq!(id, u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]));
                assert_eq!(body, bytes.len() - 5);
            }
            Err(error) => assert!(!error.to_string().is_empty()),
        }
    }
}

/// A project's files: the shipped daemon file, connectors and schemas.
fn project(dir: &Path) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for sub in ["config", "connectors", "schemas"] {
        let from = root.join(sub);
        let to = dir.join(sub);
        std::fs::create_dir_all(&to).expect("a dir");
        copy_tree(&from, &to, &mut files);
    }
    files
}

fn copy_tree(from: &Path, to: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(from).expect("readable") {
        let entry = entry.expect("an entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).expect("a dir");
            copy_tree(&entry.path(), &target, files);
        } else {
            std::fs::copy(entry.path(), &target).expect("copied");
            if target.extension().is_some_and(|e| e == "yaml") {
                files.push(target);
            }
        }
    }
}

/// YAML mutations: text cut, lines dropped or repeated, values swapped for
/// hostile ones (huge numbers, durations and sizes, deep nesting, tabs,
/// anchors and aliases, bytes that are not UTF-8).
fn mutate_yaml(text: &str, rng: &mut StdRng) -> Vec<u8> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let hostile = [
        "99999999999999999999s",
        "18446744073709551616",
        "-1",
        "1e309",
        "99999999999PiB",
        "\"\\u0000\"",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        "&a [*a]",
        "*nowhere",
        "!!binary aGk=",
        "{ x: ",
        "${UNSET_VARIABLE}",
        "${",
        "\t",
        "~",
        "0x7fffffffffffffff",
        "ms",
        "-5s",
    ];
    for _ in 0..rng.random_range(1..4) {
        if lines.is_empty() {
            break;
        }
        let at = rng.random_range(0..lines.len());
        match rng.random_range(0..5) {
            0 => {
                lines.remove(at);
            }
            1 => {
                let line = lines[at].clone();
                lines.insert(at, line);
            }
            2 | 3 => {
                // A value replaced: after the first `: ` or the whole line.
                let value = hostile[rng.random_range(0..hostile.len())];
                let line = &lines[at];
                lines[at] = match line.find(": ") {
                    Some(colon) => format!("{}: {value}", &line[..colon]),
                    None => value.to_string(),
                };
            }
            _ => {
                let cut = rng.random_range(0..=lines[at].len());
                let cut = (0..=cut).rev().find(|&i| lines[at].is_char_boundary(i)).unwrap_or(0);
                lines[at].truncate(cut);
            }
        }
    }
    let mut bytes = lines.join("\n").into_bytes();
    if rng.random_range(0..10) == 0 {
        let at = rng.random_range(0..=bytes.len());
        bytes.insert(at, 0xff);
    }
    bytes
}

#[test]
fn the_config_loader_never_panics_and_names_file_and_line() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let files = project(dir.path());
    let originals: Vec<(PathBuf, String)> =
        files.iter().map(|f| (f.clone(), std::fs::read_to_string(f).expect("readable"))).collect();
    let config = dir.path().join("config/kawka.yaml");
    // Relative paths in the daemon file are relative to the working
    // directory; absolute ones keep the test independent of it.
    let daemon = std::fs::read_to_string(&config).expect("readable");
    let daemon = daemon
        .replace("connectors: connectors/", &format!("connectors: {}/connectors/", dir.path().display()))
        .replace("schemas: schemas/", &format!("schemas: {}/schemas/", dir.path().display()));
    std::fs::write(&config, &daemon).expect("written");
    let lookup = |_: &str| None;
    assert!(
        kawka::config::load_with(&config, &lookup).is_ok(),
        "the shipped files load: {:?}",
        kawka::config::load_with(&config, &lookup).err()
    );
    let mut rng = StdRng::seed_from_u64(seed());
    let mut refused = 0;
    for case in 0..cases() / 3 {
        let (file, original) = &originals[rng.random_range(0..originals.len())];
        let original = if *file == config { &daemon } else { original };
        std::fs::write(file, mutate_yaml(original, &mut rng)).expect("written");
        let loaded = catch_unwind(AssertUnwindSafe(|| kawka::config::load_with(&config, &lookup)));
        let Ok(loaded) = loaded else {
            panic!("seed {} case {case}: the loader panicked on {}:\n{}", seed(), file.display(), {
                String::from_utf8_lossy(&std::fs::read(file).unwrap_or_default())
            })
        };
        if let Err(problems) = loaded {
            refused += 1;
            assert!(!problems.0.is_empty(), "seed {} case {case}: an error without problems", seed());
            for problem in &problems.0 {
                // (A mutated `connectors:` line may point elsewhere, even
                // at the working directory's files: still a file.)
                assert!(!problem.file.as_os_str().is_empty(), "{problem}: names a file");
                assert!(!problem.message.is_empty(), "{problem}: says what is wrong");
            }
            // The mutated file's problems point into it (a line, or the
            // file as a whole when it cannot be read as text).
            assert!(
                problems.0.iter().any(|p| p.file == *file || p.line > 0),
                "seed {} case {case}: {problems}",
                seed()
            );
        }
        std::fs::write(file, if *file == config { &daemon } else { original }).expect("restored");
    }
    eprintln!("{refused} of {} mutated projects refused", cases() / 3);
    assert!(refused > 0, "mutations must be refused sometimes");
}
