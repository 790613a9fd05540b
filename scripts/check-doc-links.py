#!/usr/bin/env python3
"""Checks the Markdown documentation of this repository.

    scripts/check-doc-links.py          # relative links and #anchors
    scripts/check-doc-links.py --paths  # also: `backticked/repo/paths` exist

Reads README.md, BENCHMARKS.md, deploy/README.md and docs/**/*.md. A link
that is not http(s)/mailto must name an existing file, and its #anchor a
heading of that file (GitHub's slug rules). With --paths, every backticked
string that starts with a top-level folder of the repository (hub/, edge/,
...) must exist; placeholders (<id>, *, {a,b}, ...) are skipped. Prints one
line per problem and exits 1 if there was any.
"""
import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("hub/", "edge/", "shared/", "bench/", "fuzz/", "deploy/", "systemd/",
       "scripts/", ".ci/", "docs/", ".cargo/")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`]+)`")


def docs():
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "deploy/README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.exists()]


def prose(text):
    """Lines outside fenced code blocks, with their numbers."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading):
    s = heading.strip().lower()
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)  # a link in a heading keeps its text
    out = []
    for ch in s:
        cat = unicodedata.category(ch)
        if ch in " -_" or cat[0] in "LN":
            out.append("-" if ch == " " else ch)
    return "".join(out)


def anchors(path, cache={}):
    if path not in cache:
        seen, found = {}, set()
        for _, line in prose(path.read_text(encoding="utf-8")):
            m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if m:
                base = slug(m.group(2))
                k = seen.get(base, 0)
                seen[base] = k + 1
                found.add(base if k == 0 else f"{base}-{k}")
        cache[path] = found
    return cache[path]


def main():
    check_paths = "--paths" in sys.argv[1:]
    problems = []
    for doc in docs():
        rel = doc.relative_to(ROOT)
        for n, line in prose(doc.read_text(encoding="utf-8")):
            bare = CODE.sub("", line)
            for target in LINK.findall(bare):
                if re.match(r"[a-z]+:", target):
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (doc.parent / file_part).resolve() if file_part else doc
                if not dest.exists():
                    problems.append(f"{rel}:{n}: link to missing {target}")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    problems.append(f"{rel}:{n}: no heading for #{anchor} in {dest.relative_to(ROOT)}")
            if check_paths:
                for code in CODE.findall(line):
                    p = code.split("::")[0].rstrip(".,:;)")
                    if not p.startswith(TOP) or re.search(r"[<>*{}\s$…]|\.\.\.", p):
                        continue
                    if not (ROOT / p).exists():
                        problems.append(f"{rel}:{n}: path `{p}` does not exist")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
