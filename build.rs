//! Compiles `src/source/headers.c`, the one function kawka takes from
//! librdkafka's internals, against the librdkafka tree rdkafka-sys built
//! and links (its `links = "rdkafka"` hands the tree's path to direct
//! dependents as `DEP_RDKAFKA_ROOT`), so the struct layout it reads is the
//! linked library's.

fn main() {
    println!("cargo:rerun-if-changed=src/source/headers.c");
    println!("cargo:rerun-if-env-changed=DEP_RDKAFKA_ROOT");
    println!("cargo:rerun-if-env-changed=DEP_Z_INCLUDE");
    let Some(root) = std::env::var_os("DEP_RDKAFKA_ROOT") else {
        panic!(
            "rdkafka-sys did not say where it built librdkafka (DEP_RDKAFKA_ROOT): kawka needs its default \
             build from the bundled sources (not `cmake-build` or `dynamic-linking`)"
        );
    };
    let root = std::path::PathBuf::from(root);
    let mut build = cc::Build::new();
    build
        .file("src/source/headers.c")
        .include(&root)
        .include(root.join("src"))
        // Its headers are librdkafka's: their warnings are not ours to mend.
        .warnings(false);
    // librdkafka's headers include zlib's: where libz-sys put them when it
    // built zlib itself (a machine without zlib's headers).
    if let Some(paths) = std::env::var_os("DEP_Z_INCLUDE") {
        for path in paths.to_string_lossy().split(',').filter(|path| !path.is_empty()) {
            build.include(path);
        }
    }
    build.compile("kawka_rdkafka");
}
