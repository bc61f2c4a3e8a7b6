"""The site builds in strict mode without a warning, strict mode fails on what breaks a site, the
API reference shows every public name with its docstring, and the README stays one page."""

from __future__ import annotations

import html
import inspect
import os
import re
from pathlib import Path

import pytest

import lightning_kfac
from tests.conftest import ROOT
from tests.docs import pages
from tests.docs.conftest import copy_for_build, mkdocs_build

README_MAX_LINES = 200
# what the reference shows beyond lightning_kfac.__all__ (documented public API, ROUND.md)
ALSO_DOCUMENTED = [
    "lightning_kfac.schedules.Constant",
    "lightning_kfac.schedules.StepDecay",
    "lightning_kfac.schedules.ExponentialDecay",
    "lightning_kfac.schedules.LinearWarmup",
    "lightning_kfac.schedules.Cosine",
    "lightning_kfac.schedules.Schedule",
    "lightning_kfac.engine.staleness.StalenessConfig",
    "lightning_kfac.testing.oracles.damped_kronecker_solve",
    "lightning_kfac.testing.distributed.run_distributed",
]
ROLE = re.compile(r":\w+:`~?([\w.]+)`")


def test_the_site_builds_in_strict_mode_without_a_warning(built_site):
    assert built_site.returncode == 0, built_site.output[-6000:]
    warnings = [line for line in built_site.output.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)


def _break_links_and_a_reference(root: Path) -> list[str]:
    page = root / "docs" / "getting-started.md"
    text = page.read_text()
    assert "(tuning.md)" in text and "(monitoring.md#what-is-logged)" in text
    text = text.replace("(tuning.md)", "(no-such-page.md)", 1)
    page.write_text(text.replace("(monitoring.md#what-is-logged)", "(monitoring.md#no-such-heading)", 1))
    callback = root / "lightning_kfac" / "callback.py"
    source = callback.read_text()
    anchor = '"""Owns the K-FAC hyperparameters'
    assert anchor in source
    callback.write_text(
        source.replace(anchor, '"""See :class:`~lightning_kfac.NoSuchClass`. Owns the K-FAC hyperparameters')
    )
    return ["no-such-page.md", "no-such-heading", "lightning_kfac.NoSuchClass"]


def _include_a_missing_file(root: Path) -> list[str]:
    page = root / "docs" / "results" / "batch_scaling" / "index.md"
    text = page.read_text()
    page.write_text(text.replace("benchmarks/results/batch_scaling/RESULTS.md", "benchmarks/results/gone/RESULTS.md"))
    return ["benchmarks/results/gone/RESULTS.md"]


@pytest.mark.parametrize(
    "breakage", [_break_links_and_a_reference, _include_a_missing_file], ids=lambda f: f.__name__[1:]
)
def test_strict_mode_fails_on_what_breaks_the_site(breakage, tmp_path):
    """What CI's `make docs` guards against, broken in a copy of the project: a link to a missing
    page, a link to a missing heading and a docstring cross-reference to nothing (one build,
    which reports all three), and an include of a missing file (which stops the build at once)."""
    copy_for_build(str(tmp_path))
    expected = breakage(tmp_path)
    build = mkdocs_build(str(tmp_path), str(tmp_path / "site"))
    assert build.returncode != 0, build.output[-4000:]
    for text in expected:
        assert text in build.output, f"{text!r} not reported:\n{build.output[-4000:]}"


def _html(site: str, page: str) -> str:
    """The built file of a page (mkdocs.yml: use_directory_urls is off)."""
    return os.path.join(site, page.removesuffix(".md") + ".html")


def _page_words(site: str, page: str) -> list[str]:
    with open(_html(site, page)) as f:
        text = re.sub(r"<[^>]+>", " ", f.read())
    return re.findall(r"\w+", html.unescape(text))


def _first_paragraph_words(obj: object) -> list[str]:
    doc = inspect.getdoc(obj)
    assert doc, f"{obj!r} has no docstring"
    first = ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], doc.split("\n\n")[0])
    return re.findall(r"\w+", first)


def _contains(words: list[str], part: list[str]) -> bool:
    n = len(part)
    return any(words[i : i + n] == part for i in range(len(words) - n + 1))


def _object(path: str) -> object:
    module_name, _, name = path.rpartition(".")
    module = __import__(module_name, fromlist=[name])
    return getattr(module, name)


def test_the_api_reference_shows_every_public_name_with_its_docstring(built_site):
    assert built_site.returncode == 0, built_site.output[-4000:]
    public = [name for name in lightning_kfac.__all__ if name != "__version__"]  # a string, no docstring
    assert {"KFACDDPStrategy", "KFACCallback", "KFACPreconditioner", "KFACConfig", "SkippedLayer"} <= set(public)
    reference = sorted(p for p in pages.nav_pages() if p.startswith("reference/"))
    rendered = {}
    for page in reference:
        with open(_html(built_site.site, page)) as f:
            rendered[page] = f.read()
    for path in [f"lightning_kfac.{name}" for name in public] + ALSO_DOCUMENTED:
        obj = _object(path)
        canonical = f"{obj.__module__}.{obj.__qualname__}"  # type: ignore[attr-defined]
        holders = [p for p, text in rendered.items() if f'id="{path}"' in text or f'id="{canonical}"' in text]
        assert holders, f"{path}: no reference page has its anchor"
        words = _page_words(built_site.site, holders[0])
        assert _contains(words, _first_paragraph_words(obj)), f"{path}: its docstring is not on {holders[0]}"


def test_every_page_is_in_the_nav_once():
    nav = pages.nav_pages()
    assert len(nav) == len(set(nav)), nav
    assert set(nav) == set(pages.source_pages()), set(nav) ^ set(pages.source_pages())


def test_the_readme_is_one_page_whose_links_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) < README_MAX_LINES
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if "://" not in link:
            assert os.path.exists(os.path.join(ROOT, link)), link


def test_results_are_included_from_one_place_without_their_title():
    """Every include of a benchmark's RESULTS.md sits on a page under docs/results/ and starts at
    line 2, which drops exactly the file's title (the page has its own)."""
    include = re.compile(r'^--8<-- "(benchmarks/results/[^":]*RESULTS\.md)(?::(\d+):)?"', re.M)
    found = []
    for page in pages.source_pages():
        with open(os.path.join(pages.DOCS, page)) as f:
            for match in include.finditer(f.read()):
                found.append(page)
                assert page.startswith("results/"), f"{page} includes {match.group(1)}: keep includes in docs/results/"
                assert match.group(2) == "2", f"{page}: include {match.group(1)} from line 2"
                with open(os.path.join(ROOT, match.group(1))) as results:
                    assert results.readline().startswith("# "), f"{match.group(1)}: line 1 is not its title"
    assert found


def test_the_changelog_page_is_the_changelog():
    with open(os.path.join(pages.DOCS, "changelog.md")) as f:
        assert f.read().strip() == '--8<-- "CHANGELOG.md"'
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert pages.expanded("changelog.md").strip() == f.read().strip()
