//! A command line as clap builds it, compared with its reference page in
//! `docs/`: the "Options" table (one row per flag: flag | env | default |
//! commands | meaning) and the table of commands. Each function returns
//! one message per drifted row or flag, naming the file, line and flag; a
//! test asserts the list is empty.

use std::collections::{BTreeMap, BTreeSet};

use clap::{ArgAction, Command};

use crate::docs::{code_spans, leading_code, Row, Table};

/// One `--flag` as the parser knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CliFlag {
    /// The environment variable it falls back to.
    pub env: Option<String>,
    /// Its default value (values joined with `,`), or the one its help
    /// text states as `[default: X]` when the program applies it itself.
    pub default: Option<String>,
    /// A switch (present or not) rather than a flag with a value.
    pub switch: bool,
    /// Accepted by every command.
    pub global: bool,
    /// The commands that take it (`""` = the top level).
    pub commands: BTreeSet<String>,
}

impl CliFlag {
    /// Where the flag is accepted, as the docs say it: `all`, or the
    /// commands (a flag of the top level that a subcommand also takes —
    /// `ems-hub`'s flattened `serve` flags — counts as that subcommand's).
    pub fn commands_label(&self) -> BTreeSet<String> {
        if self.global {
            return BTreeSet::from(["all".to_string()]);
        }
        let mut c = self.commands.clone();
        if c.len() > 1 {
            c.remove("");
        }
        c.into_iter()
            .map(|p| {
                if p.is_empty() {
                    "(top level)".into()
                } else {
                    p
                }
            })
            .collect()
    }
}

/// Every `--flag` of `root` and its subcommands, by long name (without
/// the dashes). `--help` and `--version` are left out.
pub fn cli_flags(root: &Command) -> BTreeMap<String, CliFlag> {
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

fn walk(cmd: &Command, path: &str, out: &mut BTreeMap<String, CliFlag>) {
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let f = out.entry(long.to_string()).or_default();
        f.commands.insert(path.to_string());
        f.global |= arg.is_global_set();
        f.env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        f.switch = matches!(arg.get_action(), ArgAction::SetTrue);
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let stated = arg.get_help().and_then(|h| {
            let h = h.to_string();
            let rest = h.split("[default: ").nth(1)?;
            Some(rest.split(']').next()?.to_string())
        });
        f.default = if f.switch {
            None
        } else if defaults.is_empty() {
            stated
        } else {
            Some(defaults.join(","))
        };
    }
    for sub in cmd.get_subcommands() {
        let p = if path.is_empty() {
            sub.get_name().to_string()
        } else {
            format!("{path} {}", sub.get_name())
        };
        walk(sub, &p, out);
    }
}

/// Compares the "Options" table with the parser, both ways: every flag
/// has a row, every row is a flag, and env, default and commands match.
pub fn options_drift(bin: &str, root: &Command, table: &Table) -> Vec<String> {
    let flags = cli_flags(root);
    let (c_flag, c_env, c_default, c_commands) = (
        table.column("flag"),
        table.column("env"),
        table.column("default"),
        table.column("commands"),
    );
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for row in &table.rows {
        let at = table.at(row);
        let Some(name) = leading_code(row.cell(c_flag)).and_then(|f| f.strip_prefix("--")) else {
            problems.push(format!(
                "{at}: the flag cell {:?} is not `--name`",
                row.cell(c_flag)
            ));
            continue;
        };
        if !seen.insert(name.to_string()) {
            problems.push(format!("{at}: `--{name}` has a second row"));
        }
        let Some(flag) = flags.get(name) else {
            problems.push(format!(
                "{at}: `--{name}` is documented, but {bin} has no such flag"
            ));
            continue;
        };
        check_env(&mut problems, &at, name, flag, row.cell(c_env));
        check_default(&mut problems, &at, name, flag, row.cell(c_default));
        check_commands(&mut problems, &at, name, flag, row, c_commands);
    }
    for (name, flag) in &flags {
        if !seen.contains(name) {
            problems.push(format!(
                "{} table {:?}: `--{name}` of {bin} (commands {:?}, env {:?}, default {:?}) has no row",
                table.doc,
                table.heading,
                flag.commands_label(),
                flag.env,
                flag.default
            ));
        }
    }
    problems
}

fn check_env(problems: &mut Vec<String>, at: &str, name: &str, flag: &CliFlag, cell: &str) {
    let documented = leading_code(cell);
    if documented != flag.env.as_deref() {
        problems.push(format!(
            "{at}: `--{name}` env: the row says {}, {}",
            documented.map_or_else(|| format!("none ({cell:?})"), |e| format!("`{e}`")),
            flag.env.as_deref().map_or_else(
                || "the parser reads none".to_string(),
                |e| format!("the parser reads `{e}`")
            )
        ));
    }
}

fn check_default(problems: &mut Vec<String>, at: &str, name: &str, flag: &CliFlag, cell: &str) {
    let only_code = leading_code(cell).filter(|c| cell.trim() == format!("`{c}`"));
    match (&flag.default, flag.switch) {
        (_, true) if cell != "off" => problems.push(format!(
            "{at}: `--{name}` is a switch: its default cell must say `off`, not {cell:?}"
        )),
        (Some(d), false) if leading_code(cell) != Some(d.as_str()) => problems.push(format!(
            "{at}: `--{name}` default: the row says {cell:?}, the parser's default is `{d}`"
        )),
        (None, false) if only_code.is_some() => problems.push(format!(
            "{at}: `--{name}` default: the row says {cell:?}, but the parser has no default \
             (say what happens without the flag, e.g. \"none\")"
        )),
        _ => {}
    }
}

fn check_commands(
    problems: &mut Vec<String>,
    at: &str,
    name: &str,
    flag: &CliFlag,
    row: &Row,
    column: usize,
) {
    let cell = row.cell(column);
    let documented: BTreeSet<String> = if cell.starts_with("all") {
        BTreeSet::from(["all".to_string()])
    } else {
        code_spans(cell).into_iter().map(str::to_string).collect()
    };
    if documented != flag.commands_label() {
        problems.push(format!(
            "{at}: `--{name}` commands: the row says {documented:?}, the parser takes it in {:?}",
            flag.commands_label()
        ));
    }
}

/// The leaf commands of `root` (`"device add"`, `"watch"`, …) with the
/// number of positional arguments each takes and its flags.
fn leaf_commands(root: &Command) -> BTreeMap<String, (usize, BTreeSet<String>)> {
    fn go(cmd: &Command, path: &str, out: &mut BTreeMap<String, (usize, BTreeSet<String>)>) {
        let subs: Vec<&Command> = cmd.get_subcommands().collect();
        if subs.is_empty() && !path.is_empty() {
            let positionals = cmd.get_arguments().filter(|a| a.is_positional()).count();
            let flags = cmd
                .get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect();
            out.insert(path.to_string(), (positionals, flags));
        }
        for sub in subs {
            let p = if path.is_empty() {
                sub.get_name().to_string()
            } else {
                format!("{path} {}", sub.get_name())
            };
            go(sub, &p, out);
        }
    }
    let mut out = BTreeMap::new();
    go(root, "", &mut out);
    out
}

/// Compares a table of commands (first column: `` `bin [cmd] sub ARG [--flag N]` ``)
/// with the parser's leaf commands, both ways, and checks each row's
/// placeholders (one per positional argument) and `--flags`.
pub fn commands_drift(bin: &str, root: &Command, table: &Table) -> Vec<String> {
    let leaves = leaf_commands(root);
    let globals: BTreeSet<String> = cli_flags(root)
        .into_iter()
        .filter(|(_, f)| f.global)
        .map(|(n, _)| n)
        .collect();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for row in &table.rows {
        let at = table.at(row);
        let usage = leading_code(row.cell(0)).unwrap_or("");
        let Some(rest) = usage.strip_prefix(bin) else {
            problems.push(format!("{at}: {usage:?} does not start with `{bin}`"));
            continue;
        };
        let tokens: Vec<&str> = rest.split_whitespace().collect();
        let mut path = Vec::new();
        let mut i = 0;
        while let Some(t) = tokens.get(i) {
            let word = t.trim_start_matches('[').trim_end_matches(']');
            let is_name = word.starts_with(|c: char| c.is_ascii_lowercase())
                && word
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-' || c.is_ascii_digit());
            if !is_name {
                break;
            }
            path.push(word);
            i += 1;
        }
        let path = path.join(" ");
        let Some((positionals, flags)) = leaves.get(&path) else {
            problems.push(format!(
                "{at}: `{bin} {path}` is documented, but there is no such command"
            ));
            continue;
        };
        seen.insert(path.clone());
        let placeholders = tokens[i..]
            .iter()
            .take_while(|t| t.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .count();
        if placeholders != *positionals {
            problems.push(format!(
                "{at}: `{bin} {path}` takes {positionals} argument(s), the row shows {placeholders}"
            ));
        }
        for t in &tokens[i..] {
            let t = t.trim_matches(|c| matches!(c, '[' | ']' | '(' | ')'));
            if let Some(f) = t.strip_prefix("--") {
                if !flags.contains(f) && !globals.contains(f) {
                    problems.push(format!("{at}: `{bin} {path}` has no flag `--{f}`"));
                }
            }
        }
    }
    for path in leaves.keys() {
        if !seen.contains(path) {
            problems.push(format!(
                "{} table {:?}: the command `{bin} {path}` has no row",
                table.doc, table.heading
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cli() -> Command {
        Command::new("tool")
            .arg(Arg::new("level").long("level").global(true).env("T_LEVEL"))
            .subcommand(Command::new("run").arg(Arg::new("count").long("count").default_value("3")))
            .subcommand(
                Command::new("add")
                    .arg(Arg::new("id").required(true))
                    .arg(Arg::new("all").long("all").action(ArgAction::SetTrue)),
            )
    }

    fn table(text: &str) -> Table {
        Table::parse(text, "t.md", "T").unwrap()
    }

    #[test]
    fn a_matching_page_has_no_drift() {
        let t = table(
            "## T\n| flag | env | default | commands | meaning |\n|---|---|---|---|---|\n\
             | `--level` | `T_LEVEL` | `info` when unset | all | x |\n\
             | `--count` | — | `3` | `run` | x |\n\
             | `--all` | — | off | `add` | x |\n",
        );
        assert_eq!(options_drift("tool", &cli(), &t), Vec::<String>::new());
        let c = table(
            "## T\n| command | does |\n|---|---|\n| `tool [run] [--count N]` | x |\n\
             | `tool add ID [--all]` | x |\n",
        );
        assert_eq!(commands_drift("tool", &cli(), &c), Vec::<String>::new());
    }

    #[test]
    fn each_kind_of_drift_is_named() {
        let t = table(
            "## T\n| flag | env | default | commands | meaning |\n|---|---|---|---|---|\n\
             | `--level` | — | none | all | x |\n\
             | `--count` | — | `5` | `add` | x |\n\
             | `--gone` | — | none | `run` | x |\n",
        );
        let p = options_drift("tool", &cli(), &t);
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(
            p[0].contains("line 4") && p[0].contains("`--level` env"),
            "{}",
            p[0]
        );
        assert!(p[1].contains("default") && p[1].contains("`3`"), "{}", p[1]);
        assert!(p[2].contains("commands"), "{}", p[2]);
        assert!(p[3].contains("`--gone` is documented"), "{}", p[3]);
        assert!(
            p[4].contains("`--all` of tool") && p[4].contains("has no row"),
            "{}",
            p[4]
        );
        let c =
            table("## T\n| command | does |\n|---|---|\n| `tool run X` | x |\n| `tool rm` | x |\n");
        let p = commands_drift("tool", &cli(), &c);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(p[0].contains("takes 0 argument(s), the row shows 1"));
        assert!(p[1].contains("`tool rm` is documented"));
        assert!(p[2].contains("`tool add` has no row"));
    }
}
