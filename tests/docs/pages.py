"""The pages of the site and of the README as a reader sees them, for the docs tests.

A page's text is its Markdown source with every ``--8<--`` include expanded by the same
pymdownx.snippets preprocessor, with the same settings, that ``mkdocs build`` runs: a block a
page includes from the README is on that page, and is the README's block. The code blocks of all
pages are collected once; a block that appears on several pages (the quickstart is on the README,
the home page and "Getting started") is one block, run once.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from tests.conftest import ROOT

README = "README.md"
MKDOCS_YML = os.path.join(ROOT, "mkdocs.yml")
DOCS = os.path.join(ROOT, "docs")
# a fenced block, and the HTML comment right above it, if any (`<!-- test: torchrun -->`)
FENCE = re.compile(
    r"(?:^<!--\s*(?P<note>[^>]*?)\s*-->\n)?"  # the note
    r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$",
    re.S | re.M,
)


class _Loader(yaml.SafeLoader):
    """mkdocs.yml with its ``!!python/name:`` tags read as plain strings."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


@functools.cache
def mkdocs_config() -> dict[str, Any]:
    with open(MKDOCS_YML) as f:
        return yaml.load(f, Loader=_Loader)


def nav_pages() -> list[str]:
    """Every page of the nav, as a path under docs/, in nav order."""
    found: list[str] = []

    def walk(entry: Any) -> None:
        if isinstance(entry, str):
            found.append(entry)
        elif isinstance(entry, list):
            for item in entry:
                walk(item)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)

    walk(mkdocs_config()["nav"])
    return found


def source_pages() -> list[str]:
    """Every Markdown file under docs/ (paths relative to docs/), tools and includes aside."""
    pages = []
    for folder, subfolders, names in os.walk(DOCS):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("_"))
        pages += [os.path.relpath(os.path.join(folder, n), DOCS) for n in sorted(names) if n.endswith(".md")]
    return pages


def _snippets_settings() -> dict[str, Any]:
    for entry in mkdocs_config()["markdown_extensions"]:
        if isinstance(entry, dict) and "pymdownx.snippets" in entry:
            return dict(entry["pymdownx.snippets"])
    raise AssertionError("mkdocs.yml does not enable pymdownx.snippets")


@functools.cache
def expanded(page: str) -> str:
    """The text of ``page`` (``README.md``, or a path under docs/) with its includes expanded."""
    import markdown

    settings = _snippets_settings()
    settings["base_path"] = [os.path.join(ROOT, p) for p in settings.get("base_path", ["."])]
    md = markdown.Markdown(extensions=["pymdownx.snippets"], extension_configs={"pymdownx.snippets": settings})
    path = os.path.join(ROOT, page) if page == README else os.path.join(DOCS, page)
    with open(path) as f:
        lines = f.read().split("\n")
    return "\n".join(md.preprocessors["snippet"].run(lines))


def site_pages() -> list[str]:
    """The README and every page of the site."""
    return [README, *nav_pages()]


@dataclass
class Block:
    """One code block, with every page it appears on."""

    lang: str
    body: str
    note: str  # the HTML comment right above the fence ("test: torchrun", "output: ..."), or ""
    pages: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        first = self.pages[0]
        position = next(i for i, block in enumerate(blocks_on(first)) if block is self)
        return f"{first}:{self.lang}:{position + 1}"


def _blocks_of(text: str) -> list[tuple[str, str, str]]:
    found = []
    for match in FENCE.finditer(text):
        indent = len(match.group("indent"))
        body = "\n".join(line[indent:] for line in match.group("body").split("\n"))
        found.append((match.group("lang"), body, match.group("note") or ""))
    return found


@functools.cache
def all_blocks() -> list[Block]:
    """Every distinct code block of the README and the site, in page order."""
    blocks: dict[tuple[str, str], Block] = {}
    for page in site_pages():
        for lang, body, note in _blocks_of(expanded(page)):
            block = blocks.setdefault((lang, body), Block(lang, body, note))
            block.note = block.note or note
            if page not in block.pages:
                block.pages.append(page)
    return list(blocks.values())


def blocks_on(page: str) -> list[Block]:
    keys = [(lang, body) for lang, body, _ in _blocks_of(expanded(page))]
    by_key = {(b.lang, b.body): b for b in all_blocks()}
    unique: list[Block] = []
    for key in keys:
        if by_key[key] not in unique:
            unique.append(by_key[key])
    return unique


def blocks(lang: str, note: str | None = None) -> list[Block]:
    """The distinct blocks in ``lang`` (with the note ``note``, when given)."""
    return [b for b in all_blocks() if b.lang == lang and (note is None or b.note == note)]


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with ``| header_start``."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith(f"| {header_start}"):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with a header starting {header_start!r}")
