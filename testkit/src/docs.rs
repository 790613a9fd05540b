//! Reading the reference tables in `docs/` for the tests that keep them
//! and the code from drifting apart: a Markdown pipe table under a
//! heading, its rows with their line numbers, the code spans of a cell.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The workspace root (the test kit lives one level below it).
pub fn workspace_root() -> PathBuf {
    let kit = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    kit.parent().map(PathBuf::from).unwrap_or(kit)
}

/// The text of `docs/<rel>` (panics naming the file if it cannot be read).
pub fn read_doc(rel: &str) -> String {
    let path = workspace_root().join("docs").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// One pipe table of a document.
#[derive(Debug, Clone)]
pub struct Table {
    /// `docs/…` path, for messages.
    pub doc: String,
    /// The heading the table is under, without the `#`s.
    pub heading: String,
    /// The header cells.
    pub header: Vec<String>,
    /// The body rows.
    pub rows: Vec<Row>,
}

/// One body row.
#[derive(Debug, Clone)]
pub struct Row {
    /// 1-based line number in the document.
    pub line: usize,
    /// The cells, trimmed, with `\|` unescaped.
    pub cells: Vec<String>,
}

impl Table {
    /// The first table under the heading whose text is `heading` (any
    /// level) in `docs/<doc>`; panics when there is none.
    pub fn under(doc: &str, heading: &str) -> Table {
        let text = read_doc(doc);
        Table::parse(&text, doc, heading)
            .unwrap_or_else(|| panic!("docs/{doc}: no table under a heading {heading:?}"))
    }

    /// The first table under `heading` in `text` (`doc` names it in
    /// messages), if there is one before the next heading.
    pub fn parse(text: &str, doc: &str, heading: &str) -> Option<Table> {
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .position(|l| heading_text(l) == Some(heading))?;
        let mut i = start + 1;
        while i < lines.len() && !lines[i].trim_start().starts_with('|') {
            if heading_text(lines[i]).is_some() {
                return None;
            }
            i += 1;
        }
        let header = split_row(lines.get(i)?);
        i += 2; // the header and the |---| line
        let mut rows = Vec::new();
        while i < lines.len() && lines[i].trim_start().starts_with('|') {
            rows.push(Row {
                line: i + 1,
                cells: split_row(lines[i]),
            });
            i += 1;
        }
        Some(Table {
            doc: format!("docs/{doc}"),
            heading: heading.to_string(),
            header,
            rows,
        })
    }

    /// Index of the column whose header is `name`; panics when missing.
    pub fn column(&self, name: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| {
                panic!(
                    "{} table {:?}: no column {name:?} (has {:?})",
                    self.doc, self.heading, self.header
                )
            })
    }

    /// `docs/x.md line N (table "Heading")`, for messages about `row`.
    pub fn at(&self, row: &Row) -> String {
        format!("{} line {} (table {:?})", self.doc, row.line, self.heading)
    }
}

impl Row {
    /// The cell in column `i` ("" when the row is short).
    pub fn cell(&self, i: usize) -> &str {
        self.cells.get(i).map_or("", String::as_str)
    }
}

/// The text of a Markdown heading line, without `#`s.
fn heading_text(line: &str) -> Option<&str> {
    let rest = line.trim_start_matches('#');
    (rest.len() < line.len() && rest.starts_with(' ')).then(|| rest.trim())
}

/// The cells of a `| a | b |` line; `\|` is a literal pipe.
fn split_row(line: &str) -> Vec<String> {
    let inner = line.trim();
    let inner = inner.strip_prefix('|').unwrap_or(inner);
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut cells = Vec::new();
    let mut cur = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cur.push('|');
                chars.next();
            }
            '|' => cells.push(std::mem::take(&mut cur).trim().to_string()),
            c => cur.push(c),
        }
    }
    cells.push(cur.trim().to_string());
    cells
}

/// The contents of the `` `code` `` spans of a cell, in order.
pub fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// The cell's first code span, if the cell starts with one.
pub fn leading_code(cell: &str) -> Option<&str> {
    cell.trim_start()
        .strip_prefix('`')
        .and_then(|rest| rest.split('`').next())
}

/// Every `.rs` file under `dir`, with its text.
pub fn rust_sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                out.push((p, text));
            }
        }
    }
    out.sort();
    out
}

/// The environment variables the code under `dir` reads by name:
/// `env::var("X")`, `env::var_os("X")`, and `const …_ENV: &str = "X"`.
pub fn env_vars_read(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (_, text) in rust_sources(dir) {
        for line in text.lines() {
            let t = line.trim_start();
            let is_const = t.starts_with("const ") || t.starts_with("pub const ");
            let reads = line.contains("env::var(\"")
                || line.contains("env::var_os(\"")
                || (is_const && line.contains("_ENV: &str = \""));
            if !reads {
                continue;
            }
            for lit in line.split('"').skip(1).step_by(2) {
                if !lit.is_empty()
                    && lit
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                {
                    out.insert(lit.to_string());
                }
            }
        }
    }
    out
}

/// Whether any `.rs` file under `dir` contains `needle`.
pub fn sources_mention(dir: &Path, needle: &str) -> bool {
    rust_sources(dir).iter().any(|(_, t)| t.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# T\n\n## Options\n\nSome words.\n\n| flag | env |\n| --- | --- |\n\
        | `--a` | `A` (comma-separated) |\n| `x \\| y` | — |\n\nafter\n\n## Other\n";

    #[test]
    fn reads_a_table_under_a_heading() {
        let t = Table::parse(DOC, "t.md", "Options").unwrap();
        assert_eq!(t.header, ["flag", "env"]);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0].line, 9);
        assert_eq!(t.rows[0].cells, ["`--a`", "`A` (comma-separated)"]);
        assert_eq!(t.rows[1].cell(0), "`x | y`");
        assert_eq!(t.column("env"), 1);
        assert!(Table::parse(DOC, "t.md", "Other").is_none());
        assert!(Table::parse(DOC, "t.md", "Missing").is_none());
        assert_eq!(t.at(&t.rows[1]), "docs/t.md line 10 (table \"Options\")");
    }

    #[test]
    fn code_spans_of_a_cell() {
        assert_eq!(code_spans("`a` or `b`"), ["a", "b"]);
        assert_eq!(leading_code("`info` for serve"), Some("info"));
        assert_eq!(leading_code("none"), None);
        assert!(code_spans("none").is_empty());
    }
}
