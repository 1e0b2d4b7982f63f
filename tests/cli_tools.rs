//! The command line fits a shell: every command's `--help` has an example,
//! completion scripts load in bash, the man pages render. No services.

use std::process::Command;

fn kawka(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kawka")).args(args).output().expect("kawka runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The subcommands a `--help` lists under "Commands:" (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_command_says_what_it_does_with_an_example() {
    let (ok, top, _) = kawka(&["--help"]);
    assert!(ok);
    let commands = subcommands(&top);
    assert!(commands.len() >= 10, "commands listed: {commands:?}");
    let mut checked = Vec::new();
    let mut queue: Vec<Vec<String>> = commands.into_iter().map(|c| vec![c]).collect();
    while let Some(path) = queue.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let (ok, help, stderr) = kawka(&args);
        assert!(ok, "kawka {args:?}: {stderr}");
        let example = help.lines().find(|line| line.starts_with("Example: ") && line.contains("kawka "));
        assert!(example.is_some(), "`kawka {}` has no example:\n{help}", path.join(" "));
        for sub in subcommands(&help) {
            let mut deeper = path.clone();
            deeper.push(sub);
            queue.push(deeper);
        }
        checked.push(path.join(" "));
    }
    for expected in ["dlq replay", "schemas check", "registry hash-password", "completions", "man", "wait"] {
        assert!(checked.iter().any(|c| c == expected), "{expected} checked: {checked:?}");
    }
}

#[test]
fn completion_scripts_load_in_their_shell() {
    let (ok, bash, stderr) = kawka(&["completions", "bash"]);
    assert!(ok, "{stderr}");
    for word in ["rebuild", "--rollback", "replay", "--position", "hash-token"] {
        assert!(bash.contains(word), "the bash completion knows {word}");
    }
    // Sourced in a real bash, the completion function completes subcommands.
    let script = format!(
        "{bash}\nCOMP_WORDS=(kawka reb); COMP_CWORD=1; COMP_LINE='kawka reb'; COMP_POINT=9\n\
         _kawka kawka reb kawka; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let output = Command::new("bash").args(["-c", &script]).output().expect("bash runs");
    let words = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(words.trim(), "rebuild", "bash completes `kawka reb`");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let (ok, script, stderr) = kawka(&["completions", shell]);
        assert!(ok && script.contains("kawka") && script.contains("rebuild"), "{shell}: {stderr}");
    }
    let (ok, _, stderr) = kawka(&["completions", "tcsh"]);
    assert!(!ok && stderr.contains("tcsh"), "an unknown shell is refused by name: {stderr}");
}

#[test]
fn man_pages_render() {
    let (ok, page, stderr) = kawka(&["man"]);
    assert!(ok, "{stderr}");
    assert!(page.starts_with(".ie") || page.contains(".TH kawka"), "roff: {}", &page[..page.len().min(200)]);
    let dir = tempfile::tempdir().expect("temp dir");
    let (ok, _, stderr) = kawka(&["man", "--dir", dir.path().to_str().expect("utf-8 path")]);
    assert!(ok, "{stderr}");
    for page in ["kawka.1", "kawka-run.1", "kawka-rebuild.1", "kawka-dlq-replay.1", "kawka-registry.1"] {
        assert!(dir.path().join(page).exists(), "{page} written");
    }
    // groff renders it as text, with the commands and an option's help.
    let output = Command::new("groff")
        .args(["-man", "-Tutf8"])
        .arg(dir.path().join("kawka-rebuild.1"))
        .output()
        .expect("groff runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.contains("rollback") && text.contains("Example"), "rendered:\n{text}");
}
