//! The reference pages must say what the code does: `docs/hub/cli.md`
//! (the commands, one row per flag with its env and default, the
//! environment variables without a flag) against the command line clap
//! builds, and the library-only settings of `docs/hub/configuration.md`
//! against `ems_hub::Config`. A failure names the file, line and flag.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory;
use ems_testkit::cli_docs::{cli_flags, commands_drift, options_drift};
use ems_testkit::docs::{env_vars_read, leading_code, sources_mention, Table};

use crate::cli::Cli;

fn assert_no_drift(what: &str, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{what} drifted from the code ({} problem(s)); fix the page (or the code):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn cli_md_options_match_the_command_line() {
    let table = Table::under("hub/cli.md", "Options");
    assert_no_drift(
        "docs/hub/cli.md, Options",
        options_drift("ems-hub", &Cli::command(), &table),
    );
}

#[test]
fn cli_md_commands_match_the_command_line() {
    let table = Table::under("hub/cli.md", "Commands");
    assert_no_drift(
        "docs/hub/cli.md, Commands",
        commands_drift("ems-hub", &Cli::command(), &table),
    );
}

/// The variables `ems-hub` reads without a flag: each one the binary's
/// code reads has a row, each row is read by that code, none is also a
/// flag's.
#[test]
fn cli_md_environment_matches_what_the_binary_reads() {
    let table = Table::under("hub/cli.md", "Environment variables without a flag");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin/ems-hub");
    let flag_envs: BTreeSet<String> = cli_flags(&Cli::command())
        .into_values()
        .filter_map(|f| f.env)
        .collect();
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for row in &table.rows {
        let Some(var) = leading_code(row.cell(0)) else {
            problems.push(format!(
                "{}: no `VARIABLE` in the first cell",
                table.at(row)
            ));
            continue;
        };
        documented.insert(var.to_string());
        if flag_envs.contains(var) {
            problems.push(format!(
                "{}: `{var}` belongs to a flag: document it in the Options table only",
                table.at(row)
            ));
        }
        if !sources_mention(&src, &format!("\"{var}\"")) {
            problems.push(format!(
                "{}: `{var}` is documented, but hub/src/bin/ems-hub never reads it",
                table.at(row)
            ));
        }
    }
    for var in env_vars_read(&src) {
        if !documented.contains(&var) && !flag_envs.contains(&var) {
            problems.push(format!(
                "{} table {:?}: hub/src/bin/ems-hub reads `{var}`, which has no row",
                table.doc, table.heading
            ));
        }
    }
    assert_no_drift("docs/hub/cli.md, environment", problems);
}

/// `ems_hub::Config`'s fields that no flag sets (the `config.FIELD` the
/// command line's validation never assigns) are exactly the rows of
/// "Library-only settings", with the defaults `Config::new` gives them.
#[test]
fn configuration_md_library_only_settings_match_config() {
    let table = Table::under("hub/configuration.md", "Library-only settings");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config_rs = read(&root.join("src/config.rs"));
    let cli_rs = read(&root.join("src/bin/ems-hub/cli.rs"));
    let fields = struct_fields(&config_rs, "pub struct Config {");
    assert!(
        fields.len() > 10,
        "could not read Config's fields: {fields:?}"
    );
    let defaults = constructor_fields(&config_rs, "pub fn new(");
    let library_only: Vec<&String> = fields
        .iter()
        .filter(|f| {
            !cli_rs.contains(&format!("config.{f} "))
                && !cli_rs.contains(&format!("config.{f}."))
                && !cli_rs.contains(&format!("Config::new({f})"))
        })
        .collect();
    let (c_field, c_default) = (table.column("field"), table.column("default"));
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for row in &table.rows {
        let at = table.at(row);
        let Some(field) = leading_code(row.cell(c_field)) else {
            problems.push(format!("{at}: no `field` in the first cell"));
            continue;
        };
        documented.insert(field.to_string());
        if !fields.iter().any(|f| f == field) {
            problems.push(format!(
                "{at}: `{field}` is documented, but Config has no such field"
            ));
            continue;
        }
        if !library_only.contains(&&field.to_string()) {
            problems.push(format!(
                "{at}: `{field}` is set by a flag: document it in docs/hub/cli.md instead"
            ));
        }
        let Some((_, expr)) = defaults.iter().find(|(f, _)| f == field) else {
            problems.push(format!("{at}: `{field}` is not set in Config::new"));
            continue;
        };
        let code = default_of(expr).or_else(|| struct_default(expr));
        let doc = normalize(row.cell(c_default));
        if code.as_deref() != Some(doc.as_str()) {
            problems.push(format!(
                "{at}: `{field}` default: the row says {:?}, Config::new sets `{expr}`{}",
                row.cell(c_default),
                code.map_or(" (teach this test to read it)".to_string(), |c| format!(
                    " = {c}"
                ))
            ));
        }
    }
    for f in library_only {
        if !documented.contains(f.as_str()) {
            problems.push(format!(
                "{} table {:?}: Config field `{f}` has no flag and no row",
                table.doc, table.heading
            ));
        }
    }
    assert_no_drift("docs/hub/configuration.md, Library-only settings", problems);
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The `pub name:` fields of the struct that starts at the line `head`.
fn struct_fields(src: &str, head: &str) -> Vec<String> {
    src.lines()
        .skip_while(|l| l.trim() != head)
        .skip(1)
        .take_while(|l| *l != "}")
        .filter_map(|l| l.strip_prefix("    pub ")?.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}

/// `field: expression` of the struct literal in the function starting at
/// a line containing `head` (one field per line, comments skipped).
fn constructor_fields(src: &str, head: &str) -> Vec<(String, String)> {
    src.lines()
        .skip_while(|l| !l.contains(head))
        .skip_while(|l| !l.trim_end().ends_with(" {") || l.contains(head))
        .skip(1)
        .take_while(|l| l.trim() != "}")
        .filter(|l| !l.trim_start().starts_with("//"))
        .filter_map(|l| {
            let (name, expr) = l.trim().split_once(": ")?;
            Some((name.to_string(), expr.trim_end_matches(',').to_string()))
        })
        .collect()
}

/// A default as the docs write it (`5 ms`, `10 s`, `100000`), from the
/// expression `Config::new` uses; `None` for forms this test cannot read.
fn default_of(expr: &str) -> Option<String> {
    let arg = |f: &str| {
        expr.strip_prefix(f)?
            .strip_suffix(')')
            .map(|n| n.replace('_', ""))
    };
    if let Some(n) = arg("Duration::from_millis(") {
        return Some(format!("{n} ms"));
    }
    if let Some(n) = arg("Duration::from_secs(") {
        return Some(format!("{n} s"));
    }
    if expr == "QuarantineLimit::default()" {
        let q = ems_hub::config::QuarantineLimit::default();
        return Some(format!(
            "{} bytes/s, {} MiB burst",
            q.bytes_per_s,
            q.burst_bytes / (1024.0 * 1024.0)
        ));
    }
    let n = expr.replace('_', "");
    n.chars().all(|c| c.is_ascii_digit()).then_some(n)
}

/// Defaults [`default_of`] cannot read off the expression: a settings
/// struct's `Default`, rendered the way the page writes it.
fn struct_default(expr: &str) -> Option<String> {
    match expr {
        "QuarantineLimit::default()" => {
            let q = ems_hub::config::QuarantineLimit::default();
            Some(format!(
                "{} bytes/s, {} MiB burst",
                q.bytes_per_s,
                q.burst_bytes / (1024.0 * 1024.0)
            ))
        }
        _ => None,
    }
}

/// A documented default with digit groups (`100,000`, `20 000`) joined.
fn normalize(cell: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = cell.trim().chars().collect();
    for (i, c) in chars.iter().enumerate() {
        let between_digits = i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit());
        if (*c == ',' || *c == ' ' || *c == '\u{202f}') && between_digits {
            continue;
        }
        out.push(*c);
    }
    out
}

#[test]
fn default_forms() {
    assert_eq!(
        default_of("Duration::from_millis(300)").as_deref(),
        Some("300 ms")
    );
    assert_eq!(
        default_of("Duration::from_secs(10)").as_deref(),
        Some("10 s")
    );
    assert_eq!(default_of("100_000").as_deref(), Some("100000"));
    assert_eq!(default_of("RateLimit::default()"), None);
    assert_eq!(
        struct_default("QuarantineLimit::default()").as_deref(),
        Some("4096 bytes/s, 1 MiB burst")
    );
    assert_eq!(normalize("100,000"), "100000");
    assert_eq!(normalize("20 000"), "20000");
    assert_eq!(normalize("5 ms"), "5 ms");
}
