//! The manual agrees with the code: every flag and environment variable `host --help` lists is
//! in docs/operations.md's table, and the table lists nothing the binary does not take.

use std::collections::BTreeSet;

/// `--flag`s and `ENV`s named in `text`'s lines for which `is_entry` holds.
fn names(text: &str, is_entry: impl Fn(&str) -> bool) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for line in text.lines().filter(|l| is_entry(l)) {
        let words = line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        for word in words {
            if let Some(flag) = word.strip_prefix("--").filter(|f| !f.is_empty()) {
                flags.insert(flag.to_string());
            }
        }
        // The help's `[env: NAME=…]`, or the table's `` / `NAME` ``.
        for marker in ["[env: ", "/ `"] {
            for (at, _) in line.match_indices(marker) {
                let env: String = line[at + marker.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !env.is_empty() {
                    envs.insert(env);
                }
            }
        }
    }
    (flags, envs)
}

#[test]
fn every_flag_of_host_help_is_in_the_operations_manual_and_no_other() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_host"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    let (mut flags, envs) = names(&help, |l| {
        l.trim_start().starts_with("--") || l.contains("[env: ")
    });
    flags.remove("help");
    flags.remove("version");
    let manual = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    let table = manual
        .split("## Flags and environment")
        .nth(1)
        .expect("docs/operations.md has a flags table");
    let (doc_flags, doc_envs) = names(table, |l| l.starts_with("| `--"));
    let missing: Vec<_> = flags.difference(&doc_flags).collect();
    let stale: Vec<_> = doc_flags.difference(&flags).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "flags not in the manual: {missing:?}; in the manual but not taken: {stale:?}"
    );
    let missing: Vec<_> = envs.difference(&doc_envs).collect();
    let stale: Vec<_> = doc_envs.difference(&envs).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "environment not in the manual: {missing:?}; in the manual but not read: {stale:?}"
    );
}

/// `--flag`s per section: sections start at lines `starts` recognises (and names).
fn sections(
    text: &str,
    starts: impl Fn(&str) -> Option<String>,
    is_entry: impl Fn(&str) -> bool + Copy,
) -> Vec<(String, BTreeSet<String>)> {
    let mut out: Vec<(String, BTreeSet<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(heading) = starts(line) {
            out.push((heading, BTreeSet::new()));
        } else if let Some((_, flags)) = out.last_mut() {
            flags.extend(names(line, is_entry).0);
        }
    }
    out
}

#[test]
fn host_help_groups_the_flags_under_the_headings_of_the_manual() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_host"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let mut groups = sections(
        &help,
        |l| {
            let heading = l.strip_suffix(':')?;
            (!l.starts_with(' ') && !heading.contains(' ')).then(|| heading.to_string())
        },
        |l| l.trim_start().starts_with("--"),
    );
    groups.retain(|(heading, _)| heading != "Options");
    let manual = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    let table = manual.split("## Flags and environment").nth(1).unwrap();
    let documented = sections(
        table,
        |l| l.strip_prefix("### ").map(str::to_string),
        |l| l.starts_with("| `--"),
    );
    assert!(groups.len() >= 5, "{groups:?}");
    assert_eq!(groups, documented);
}
