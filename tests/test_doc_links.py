"""Every relative link in the repository's Markdown, and every Markdown path its code and configs cite, names a
file the repository tracks; every #anchor into a Markdown file names one of its headings.

- Markdown (`git ls-files '*.md'`): inline links and images `[text](path#anchor)`, reference definitions
  `[label]: path`, outside fenced code blocks and code spans. Links with a scheme (https:, mailto:) are not
  followed. The path resolves against the linking file's folder and must be a tracked file or a folder holding
  one; an anchor into a Markdown file (or `#anchor` alone: the same file) must match a heading's slug there,
  by GitHub's rules (see `slug`), or an HTML `id` / `name`.
- Code and configs (`*.py`, `*.toml`, `*.yaml`, `*.yml`, the Makefile, Dockerfiles, shell scripts) and Markdown
  prose: every path that ends in `.md` and has a folder in it (`docs/performance.md`, `../elsewhere/x.md`) must
  resolve, from the repository root or from the citing file's folder, to a tracked file inside the repository,
  and an `#anchor` after it must name a heading there. URLs, and placeholders such as `DIR/x.md`, are left out.
"""

from __future__ import annotations

import re
import subprocess
import unicodedata
from collections import Counter
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ID = re.compile(r"""<[^>]+\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target): the target up to whitespace or ')' (angle brackets allow spaces).
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
# A path with at least one folder that ends in .md: docs/x.md, ../elsewhere/docs/x.md, /abs/x.md.
MD_PATH = re.compile(r"(?<![\w.\-/])((?:\.{1,2}/|/)?(?:[\w.\-]+/)+[\w.\-]+\.md)\b(?:#([\w\-]+))?")
CITING = ("*.py", "*.toml", "*.yaml", "*.yml", "Makefile", "Dockerfile*", "*.sh", "*.cfg", "*.ini")
#: A first folder in capitals (DIR, OUT, $OUT) stands for a folder the reader picks, not a path in the repository.
PLACEHOLDER = re.compile(r"^\$?[A-Z][A-Z0-9_]*/")


@cache
def tracked(*patterns: str) -> tuple[str, ...]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", *patterns], cwd=REPO, capture_output=True, check=True, text=True
    ).stdout
    return tuple(sorted(p for p in out.split("\0") if p))


@cache
def tracked_files() -> frozenset[str]:
    return frozenset(tracked())


@cache
def tracked_dirs() -> frozenset[str]:
    dirs = set()
    for f in tracked_files():
        dirs.update(str(p) for p in PurePosixPath(f).parents if str(p) != ".")
    return frozenset(dirs)


def normalise(path: PurePosixPath) -> str | None:
    """`a/b/../c` -> `a/c`, relative to the repository root; None when it leaves the repository."""
    parts: list[str] = []
    for part in path.parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def slug(heading: str) -> str:
    """GitHub's heading anchor: the rendered text, lowercased, every character that is not a letter, mark,
    number, '_', '-' or space removed, then each space turned into '-' (no collapsing)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.lower()
    keep = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in " -_" or cat[0] in "LMN" or cat == "Pc":
            keep.append(ch)
    return "".join(keep).replace(" ", "-")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark[0] * len(mark)
            elif mark.startswith(fence):
                fence = None
            continue
        if fence is None:
            out.append((n, line))
    return out


@cache
def anchors(md_file: str) -> frozenset[str]:
    text = (REPO / md_file).read_text(encoding="utf-8")
    seen: Counter[str] = Counter()
    found = set()
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
        found.update(HTML_ID.findall(line))
    return frozenset(found)


def links(md_file: str) -> list[tuple[int, str]]:
    text = (REPO / md_file).read_text(encoding="utf-8")
    out = []
    for n, line in prose_lines(text):
        bare = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        out += [(n, m.group(1)) for m in INLINE_LINK.finditer(bare)]
        out += [(n, m.group(1)) for m in REFERENCE_DEF.finditer(bare)]
    return [(n, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for n, t in out]


def check_link(md_file: str, target: str) -> str | None:
    """Why `target` (as written in `md_file`) is broken, or None."""
    if not target or SCHEME.match(target):
        return None
    path, _, anchor = target.partition("#")
    path = path.split("?", 1)[0]
    if path:
        resolved = normalise(PurePosixPath(md_file).parent / path)
        if resolved is None:
            return "points outside the repository"
        if resolved not in tracked_files() and resolved not in tracked_dirs():
            return f"{resolved} is not a tracked file or folder"
    else:
        resolved = md_file
    if anchor and resolved.endswith(".md") and resolved in tracked_files() and anchor not in anchors(resolved):
        return f"no heading in {resolved} has the anchor #{anchor}"
    return None


def cited_paths(file: str) -> list[tuple[int, str, str]]:
    text = (REPO / file).read_text(encoding="utf-8", errors="replace")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = URL.sub(" ", line)
        out += [(n, m.group(1), m.group(2) or "") for m in MD_PATH.finditer(line)]
    return out


def check_cited(file: str, cited: str, anchor: str = "") -> str | None:
    if PLACEHOLDER.match(cited):  # DIR/gpu-table.md, OUT/x.md: a folder the reader chooses
        return None
    candidates = [normalise(PurePosixPath(cited))] if not cited.startswith(("./", "../")) else []
    candidates.append(normalise(PurePosixPath(file).parent / cited))
    if cited.startswith("/"):
        return "an absolute path: cite a file in the repository"
    found = next((c for c in candidates if c is not None and c in tracked_files()), None)
    if found is not None:
        return f"no heading in {found} has the anchor #{anchor}" if anchor and anchor not in anchors(found) else None
    if all(c is None for c in candidates):
        return "points outside the repository"
    return "names no tracked file"


def test_slug_follows_github() -> None:
    assert slug("Served vs direct (`make bench-http`)") == "served-vs-direct-make-bench-http"
    assert slug("Tiny checkpoints, CPU (2 cores, fp32, torch 2.13.0) — 2026-11-22") == (
        "tiny-checkpoints-cpu-2-cores-fp32-torch-2130--2026-11-22"
    )
    assert slug("Multi-step Marigold: `steps`, `ensemble_size`, `steps=auto`") == (
        "multi-step-marigold-steps-ensemble_size-stepsauto"
    )
    assert slug("See [the notes](docs/x.md)") == "see-the-notes"


def test_the_checks_catch_what_they_should(tmp_path: Path) -> None:
    md = next(f for f in tracked("*.md") if f == "docs/benchmarks.md")
    assert check_link(md, "benchmarks.md#gpu-check-one-lease") is None
    assert check_link(md, "#gpu-check-one-lease") is None
    assert check_link(md, "../README.md") is None
    assert check_link(md, "https://example.com/missing.md") is None
    assert "anchor" in (check_link(md, "benchmarks.md#no-such-heading") or "")
    assert "not a tracked" in (check_link(md, "missing.md") or "")
    assert "outside" in (check_link(md, "../../elsewhere/docs/x.md") or "")
    assert check_cited("load_tests/gpu_check.py", "docs/benchmarks.md") is None
    assert check_cited("load_tests/gpu_check.py", "DIR/gpu-table.md") is None
    assert check_cited("Makefile", "docs/benchmarks.md", "gpu-check-one-lease") is None
    assert "anchor" in (check_cited("Makefile", "docs/benchmarks.md", "no-such-heading") or "")
    assert check_cited("load_tests/gpu_check.py", "docs/no-such-page.md") == "names no tracked file"
    assert check_cited("load_tests/gpu_check.py", "/abs/KINDS.md") == "an absolute path: cite a file in the repository"
    assert check_cited("docs/training.md", "elsewhere/docs/notes.md") == "names no tracked file"
    assert check_cited("README.md", "../elsewhere/docs/notes.md") == "points outside the repository"
    assert cited_paths("tests/test_doc_links.py")  # this file cites paths of both kinds above
    assert [p for _, p in links("docs/performance.md")]  # the parser finds links at all


@pytest.mark.parametrize("md_file", tracked("*.md"))
def test_markdown_links_resolve(md_file: str) -> None:
    broken = [
        f"{md_file}:{n}: ({target}) {why}" for n, target in links(md_file) if (why := check_link(md_file, target))
    ]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("file", [f for f in tracked(*CITING, "*.md") if f != "tests/test_doc_links.py"])
def test_cited_markdown_files_exist(file: str) -> None:
    broken = [
        f"{file}:{n}: {cited}{'#' + anchor if anchor else ''} {why}"
        for n, cited, anchor in cited_paths(file)
        if (why := check_cited(file, cited, anchor))
    ]
    assert not broken, "\n".join(broken)
