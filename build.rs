//! Compiles `src/source/headers.c`, the one function kawka takes from
//! librdkafka's internals, against the librdkafka tree rdkafka-sys built
//! and links (its `links = "rdkafka"` hands the tree's path to direct
//! dependents as `DEP_RDKAFKA_ROOT`), so the struct layout it reads is the
//! linked library's.

fn main() {
    println!("cargo:rerun-if-changed=src/source/headers.c");
    println!("cargo:rerun-if-env-changed=DEP_RDKAFKA_ROOT");
    let Some(root) = std::env::var_os("DEP_RDKAFKA_ROOT") else {
        panic!("rdkafka-sys did not say where it built librdkafka (DEP_RDKAFKA_ROOT); kawka needs its bundled build");
    };
    let root = std::path::PathBuf::from(root);
    cc::Build::new()
        .file("src/source/headers.c")
        .include(&root)
        .include(root.join("src"))
        // Its headers are librdkafka's: their warnings are not ours to mend.
        .warnings(false)
        .compile("kawka_rdkafka");
}
