//! `kawka validate` on the shipped configuration and on broken copies of it.

mod support;

use std::path::Path;
use std::process::Command;

fn kawka_validate(dir: &Path, config: &str) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["validate", "--config", config])
        .current_dir(dir)
        .env_remove("KAWKA_CONFIG")
        .output()
        .expect("kawka runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A copy of the shipped config/ and connectors/ to break.
fn copy_of_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for sub in ["config", "connectors", "schemas"] {
        let from = support::project_root().join(sub);
        let to = dir.path().join(sub);
        std::fs::create_dir_all(&to).expect("mkdir");
        // git keeps no empty directories: a fresh clone may lack one.
        if !from.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&from).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
            }
        }
    }
    dir
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{} does not contain {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

#[test]
fn the_shipped_configuration_is_valid() {
    let (code, stdout, stderr) = kawka_validate(&support::project_root(), "config/kawka.yaml");
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("inventory") && stdout.contains("user-profiles"), "{stdout}");
}

#[test]
fn broken_files_list_every_problem_with_file_and_line_and_exit_2() {
    let project = copy_of_project();
    let root = project.path();
    edit(&root.join("config/kawka.yaml"), "  properties: {}", "  properties: {}\n  retries: 3");
    edit(&root.join("connectors/inventory.yaml"), "to: readdb", "to: warehouse");
    edit(&root.join("connectors/user-profiles.yaml"), "on_error: park", "on_error: retry_forever");
    // (Its `park:` block would be a second problem without `on_error: park`.)
    edit(&root.join("connectors/user-profiles.yaml"), "park: { max_keys: 10000, fallback: stop }\n", "");
    std::fs::write(
        root.join("connectors/copy.yaml"),
        std::fs::read_to_string(root.join("connectors/inventory.yaml")).expect("read"),
    )
    .expect("write");

    let (code, _stdout, stderr) = kawka_validate(root, "config/kawka.yaml");
    assert_eq!(code, 2, "{stderr}");
    let profiles = std::fs::read_to_string(root.join("connectors/user-profiles.yaml")).expect("read");
    let on_error_line = profiles.lines().position(|l| l.starts_with("on_error:")).expect("on_error line") + 1;
    let on_error = format!("connectors/user-profiles.yaml:{on_error_line}:11: on_error: unknown value `retry_forever`");
    let expected = [
        "config/kawka.yaml:7:3: kafka.retries: unknown field `retries`",
        on_error.as_str(),
        // Files are read in name order: the copy comes first.
        "connectors/copy.yaml:5:7: sink.to: no sink named `warehouse` in the daemon config (known: readdb, search)",
        "connectors/inventory.yaml:2:7: name: connector `inventory` is already defined in connectors/copy.yaml",
        "connectors/inventory.yaml:5:7: sink.to: no sink named `warehouse`",
    ];
    for line in expected {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    assert!(stderr.starts_with("5 problems in the configuration:"), "{stderr}");
}

#[test]
fn secrets_are_not_printed() {
    let project = copy_of_project();
    let root = project.path();
    edit(
        &root.join("config/kawka.yaml"),
        "\"${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/kawka}\"",
        "\"mysql://kawka:hunter2@db/kawka\"",
    );
    let (code, stdout, stderr) = kawka_validate(root, "config/kawka.yaml");
    assert_eq!(code, 2);
    assert!(stderr.contains("mysql://kawka:***@db/kawka` is not a postgres:// URL"), "{stderr}");
    assert!(!stderr.contains("hunter2") && !stdout.contains("hunter2"), "{stderr}");
}
