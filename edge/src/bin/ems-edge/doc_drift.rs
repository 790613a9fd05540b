//! The reference pages must say what the code does: `docs/edge/cli.md`
//! against the command line clap builds; `docs/edge/configuration.md`
//! (top-level keys, `[link]`, the environment, the meter kinds) and the
//! key table of each `docs/hardware/*.md` meter page against the config
//! parser — every key the parser accepts has a row and every row is a
//! key; "required" keys are required; a default written as a value is
//! the value the parser uses when the key is left out. A failure names
//! the file, line and key.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory;
use ems_edge::config::{Config, RawConfig, RawLink};
use ems_edge::meters::atm90e32::Atm90e32Config;
use ems_edge::meters::dc::InaConfig;
use ems_edge::meters::modbus::ModbusConfig;
use ems_edge::meters::pulse::PulseConfig;
use ems_edge::meters::simulated::SimulatedConfig;
use ems_edge::meters::MeterConfig;
use ems_testkit::cli_docs::{cli_flags, commands_drift, options_drift};
use ems_testkit::docs::{
    code_spans, env_vars_read, leading_code, read_doc, sources_mention, Table,
};
use ems_testkit::serde_fields::field_names;

use crate::Cli;

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
    let table = Table::under("edge/cli.md", "Options");
    assert_no_drift(
        "docs/edge/cli.md, Options",
        options_drift("ems-edge", &Cli::command(), &table),
    );
}

#[test]
fn cli_md_commands_match_the_command_line() {
    let table = Table::under("edge/cli.md", "`ems-edge` command line");
    assert_no_drift(
        "docs/edge/cli.md, commands",
        commands_drift("ems-edge", &Cli::command(), &table),
    );
}

/// The keys a table documents: every code span of the key cell
/// (`` `unit_id` (alias `address`) ``), `[[meter]]` as `meter`.
fn documented_keys(table: &Table) -> BTreeSet<String> {
    table
        .rows
        .iter()
        .flat_map(|r| code_spans(r.cell(0)))
        .map(|k| {
            k.trim_start_matches("[[")
                .trim_end_matches("]]")
                .to_string()
        })
        .collect()
}

/// Both directions of "every key has a row, every row is a key".
fn key_sets(table: &Table, parser: &BTreeSet<String>, what: &str) -> Vec<String> {
    let documented = documented_keys(table);
    let mut problems = Vec::new();
    for k in documented.difference(parser) {
        let row = table
            .rows
            .iter()
            .find(|r| code_spans(r.cell(0)).contains(&k.as_str()));
        let at = row.map_or_else(|| table.doc.clone(), |r| table.at(r));
        problems.push(format!(
            "{at}: `{k}` is documented, but {what} has no such key"
        ));
    }
    for k in parser.difference(&documented) {
        problems.push(format!(
            "{} table {:?}: {what} accepts `{k}`, which has no row",
            table.doc, table.heading
        ));
    }
    problems
}

fn names(fields: &[&str]) -> BTreeSet<String> {
    fields.iter().map(|f| f.to_string()).collect()
}

/// The first ```toml block of `docs/<doc>` that contains `needle`.
fn toml_example(doc: &str, needle: &str) -> toml::Table {
    let text = read_doc(doc);
    let mut blocks = text.split("```toml\n").skip(1);
    let block = blocks
        .find_map(|b| b.split("```").next().filter(|b| b.contains(needle)))
        .unwrap_or_else(|| panic!("docs/{doc}: no ```toml example with {needle:?}"));
    block
        .parse()
        .unwrap_or_else(|e| panic!("docs/{doc}: the example does not parse: {e}\n{block}"))
}

/// A documented default (first code span of the cell) as a TOML value:
/// as written when it is TOML (`1000`, `"up"`, `0x40`, `["a"]`), else as
/// a string (`/var/lib/ems-edge`). `None` when the cell is prose.
fn default_value(cell: &str) -> Option<toml::Value> {
    let code = leading_code(cell)?;
    let parsed: Option<toml::Table> = format!("v = {code}").parse().ok();
    Some(
        parsed
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(code.to_string())),
    )
}

/// For each row of `table` (key cell, default cell): a "required" key
/// left out of `base` must be refused naming it; a default written as a
/// value must give the same result as leaving the key out; any other
/// default means the key may be left out. `parse` turns a table into the
/// parser's `Debug` output or its error.
fn check_defaults(
    table: &Table,
    base: &toml::Table,
    skip: &[&str],
    parse: &dyn Fn(&toml::Table) -> Result<String, String>,
) -> Vec<String> {
    let c_default = table.column("default");
    let mut problems = Vec::new();
    if let Err(e) = parse(base) {
        problems.push(format!("{}: its TOML example is refused: {e}", table.doc));
        return problems;
    }
    for row in &table.rows {
        let Some(key) = leading_code(row.cell(0)) else {
            continue;
        };
        let key = key.trim_start_matches("[[").trim_end_matches("]]");
        if skip.contains(&key) {
            continue;
        }
        let at = table.at(row);
        let cell = row.cell(c_default);
        let mut without = base.clone();
        without.remove(key);
        let left_out = parse(&without);
        if cell == "required" {
            match left_out {
                Err(e) if e.contains(&format!("missing field `{key}`")) => {}
                Err(e) => problems.push(format!(
                    "{at}: `{key}` is documented as required; leaving it out fails, but not for it: {e}"
                )),
                Ok(_) => problems.push(format!(
                    "{at}: `{key}` is documented as required, but the parser accepts a table without it"
                )),
            }
            continue;
        }
        let left_out = match left_out {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!(
                    "{at}: `{key}` has a default ({cell:?}), but leaving it out is refused: {e}"
                ));
                continue;
            }
        };
        let Some(value) = default_value(cell) else {
            continue;
        };
        let mut with = without.clone();
        with.insert(key.to_string(), value.clone());
        match parse(&with) {
            Ok(v) if v == left_out => {}
            Ok(v) => problems.push(format!(
                "{at}: `{key}` default: the row says {cell:?}, but `{key} = {value}` parses \
                 differently from leaving it out: {}",
                first_difference(&v, &left_out)
            )),
            Err(e) => problems.push(format!(
                "{at}: `{key}` default: the row says {cell:?}, but `{key} = {value}` is refused: {e}"
            )),
        }
    }
    problems
}

/// `…with it… / …without it…` around the first place two `Debug`
/// outputs differ.
fn first_difference(with: &str, without: &str) -> String {
    let start = with
        .char_indices()
        .zip(without.chars())
        .find(|((_, a), b)| a != b)
        .map_or(with.len().min(without.len()), |((i, _), _)| i);
    let from = with[..start].rfind(", ").map_or(0, |i| i + 2);
    let excerpt = |s: &str| {
        let end = s[start..].find(", ").map_or(s.len(), |i| start + i);
        s[from.min(end)..end].to_string()
    };
    format!(
        "with it `{}`, without it `{}`",
        excerpt(with),
        excerpt(without)
    )
}

fn parse_raw(t: &toml::Table) -> Result<String, String> {
    toml::Value::Table(t.clone())
        .try_into::<RawConfig>()
        .map(|c| format!("{c:?}"))
        .map_err(|e| e.to_string())
}

#[test]
fn configuration_md_top_level_keys_match_the_parser() {
    let table = Table::under("edge/configuration.md", "Top-level keys");
    // `[link]` has a section of its own.
    let _ = Table::under("edge/configuration.md", "`[link]`");
    let mut parser = names(field_names::<RawConfig>());
    parser.remove("link");
    let mut problems = key_sets(&table, &parser, "the config file's top level");
    let base = toml_example("edge/configuration.md", "device_id");
    problems.extend(check_defaults(&table, &base, &["meter"], &parse_raw));
    // "[[meter]] — at least one": the example is accepted, and refused
    // without its meter.
    let accepts = |t: &toml::Table| {
        let text = toml::to_string(t).expect("TOML");
        Config::from_toml(&text, Path::new("edge.toml")).map(|_| ())
    };
    if let Err(e) = accepts(&base) {
        problems.push(format!(
            "{}: the minimal example is refused: {e}",
            table.doc
        ));
    }
    let mut no_meters = base.clone();
    no_meters.remove("meter");
    if accepts(&no_meters).is_ok() {
        problems.push(format!(
            "{}: `[[meter]]` is documented as \"at least one\", but a file without meters is accepted",
            table.doc
        ));
    }
    assert_no_drift("docs/edge/configuration.md, Top-level keys", problems);
}

#[test]
fn configuration_md_link_keys_match_the_parser() {
    let table = Table::under("edge/configuration.md", "`[link]`");
    let mut problems = key_sets(&table, &names(field_names::<RawLink>()), "`[link]`");
    let base = toml_example("edge/configuration.md", "device_id");
    let parse_link = |link: &toml::Table| {
        let mut t = base.clone();
        t.insert("link".into(), toml::Value::Table(link.clone()));
        parse_raw(&t)
    };
    problems.extend(check_defaults(
        &table,
        &toml::Table::new(),
        &[],
        &parse_link,
    ));
    assert_no_drift("docs/edge/configuration.md, [link]", problems);
}

/// Every variable in the Environment table is one the edge reads (its
/// code names it, or it is a flag's), and every variable the code reads
/// by name, or a flag falls back to, has a row.
#[test]
fn configuration_md_environment_matches_what_the_edge_reads() {
    let table = Table::under("edge/configuration.md", "Environment");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let flag_envs: BTreeSet<String> = cli_flags(&Cli::command())
        .into_values()
        .filter_map(|f| f.env)
        .collect();
    let documented = documented_keys(&table);
    let mut problems = Vec::new();
    for row in &table.rows {
        for var in code_spans(row.cell(0)) {
            if !flag_envs.contains(var) && !sources_mention(&src, var) {
                problems.push(format!(
                    "{}: `{var}` is documented, but edge/src never mentions it",
                    table.at(row)
                ));
            }
        }
    }
    for var in env_vars_read(&src).union(&flag_envs) {
        if !documented.contains(var) {
            problems.push(format!(
                "{} table {:?}: the edge reads `{var}`, which has no row",
                table.doc, table.heading
            ));
        }
    }
    assert_no_drift("docs/edge/configuration.md, Environment", problems);
}

/// The keys a meter kind's table accepts (besides `kind`).
fn meter_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "simulated" => field_names::<SimulatedConfig>(),
        "ina219" | "ina226" => field_names::<InaConfig>(),
        "atm90e32" => field_names::<Atm90e32Config>(),
        "pulse" => field_names::<PulseConfig>(),
        "modbus" => field_names::<ModbusConfig>(),
        other => panic!("meter kind {other:?} has no config struct in this test: add it"),
    }
}

/// The kinds the parser knows, from its answer to an unknown one.
fn parser_kinds() -> BTreeSet<String> {
    let t: toml::Table = "id = \"x\"\nkind = \"no-such-kind\"".parse().expect("TOML");
    let err = toml::Value::Table(t)
        .try_into::<MeterConfig>()
        .expect_err("an unknown kind is refused")
        .to_string();
    let expected = err
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("cannot read the kinds from {err:?}"));
    // "… expected one of `a`, `b`\nin `kind`": the list ends at the line.
    let list = expected.lines().next().unwrap_or("");
    code_spans(list).into_iter().map(str::to_string).collect()
}

/// The Meters table (kind → page) lists every kind; each page's key
/// table matches its kind's config struct, required keys and defaults
/// included, and its TOML example parses.
#[test]
fn hardware_pages_match_the_meter_parsers() {
    let meters = Table::under("edge/configuration.md", "Meters");
    let mut problems = Vec::new();
    let mut kinds = BTreeSet::new();
    for row in &meters.rows {
        let page_kinds = code_spans(row.cell(0));
        let Some(page) = row
            .cell(1)
            .split("](../")
            .nth(1)
            .and_then(|r| r.split(')').next())
        else {
            problems.push(format!("{}: no link to a page", meters.at(row)));
            continue;
        };
        kinds.extend(page_kinds.iter().map(|k| k.to_string()));
        problems.extend(check_meter_page(page, &page_kinds));
    }
    let parser = parser_kinds();
    for k in parser.difference(&kinds) {
        problems.push(format!(
            "{} table {:?}: the parser knows kind `{k}`, which has no row",
            meters.doc, meters.heading
        ));
    }
    for k in kinds.difference(&parser) {
        problems.push(format!(
            "{} table {:?}: kind `{k}` is documented, but the parser does not know it",
            meters.doc, meters.heading
        ));
    }
    assert_no_drift("the meter pages", problems);
}

fn check_meter_page(page: &str, kinds: &[&str]) -> Vec<String> {
    let table = Table::under(page, "Configuration");
    let mut problems = Vec::new();
    let Some(first) = kinds.first() else {
        return vec![format!("{}: a Meters row without a kind", table.doc)];
    };
    let mut parser = names(meter_fields(first));
    parser.insert("kind".into());
    problems.extend(key_sets(&table, &parser, &format!("`kind = \"{first}\"`")));
    // The kinds the `kind` row names are this page's.
    if let Some(row) = table
        .rows
        .iter()
        .find(|r| leading_code(r.cell(0)) == Some("kind"))
    {
        let named: BTreeSet<&str> = code_spans(row.cell(2)).into_iter().collect();
        let want: BTreeSet<&str> = kinds.iter().copied().collect();
        if named != want {
            problems.push(format!(
                "{}: the `kind` row names {named:?}, the Meters table links {want:?} here",
                table.at(row)
            ));
        }
    }
    let example = toml_example(page, "[[meter]]");
    let Some(base) = example
        .get("meter")
        .and_then(|m| m.as_array())
        .and_then(|a| a.first())
        .and_then(|m| m.as_table())
        .cloned()
    else {
        return vec![format!("docs/{page}: the example has no [[meter]] table")];
    };
    let parse_meter = |t: &toml::Table| {
        toml::Value::Table(t.clone())
            .try_into::<MeterConfig>()
            .map(|m| format!("{m:?}"))
            .map_err(|e| e.to_string())
    };
    problems.extend(check_defaults(&table, &base, &[], &parse_meter));
    for kind in kinds {
        let mut t = base.clone();
        t.insert("kind".into(), toml::Value::String(kind.to_string()));
        if let Err(e) = parse_meter(&t) {
            problems.push(format!(
                "docs/{page}: the example with kind = {kind:?} is refused: {e}"
            ));
        }
    }
    problems
}
