"""MkDocs hooks of the site (``hooks:`` in ``mkdocs.yml``).

The benchmark results live in ``benchmarks/results/``, outside the docs folder. The pages under
``docs/results/`` include their ``RESULTS.md`` files with ``--8<--``; this hook publishes the
images and JSON files next to them at ``results/`` in the site, so that the relative links of an
included ``RESULTS.md`` (``![plot](steps_to_target.png)``) resolve on its page
(``docs/results/<experiment>/index.md``) exactly as they do next to the file itself. Per-run
folders (``runs/``, ``exploration/``) stay out: hundreds of files no page links to.
"""

from __future__ import annotations

import os
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = os.path.join("benchmarks", "results")
PUBLISHED = "results"
EXTENSIONS = (".png", ".svg", ".json")
LEFT_OUT = ("runs", "exploration", "raw")


def result_files(root: str) -> list[str]:
    """Paths under ``benchmarks/results`` (relative to it) that the site publishes."""
    base = os.path.join(root, RESULTS)
    found = []
    for folder, subfolders, names in os.walk(base):
        subfolders[:] = sorted(d for d in subfolders if d not in LEFT_OUT)
        for name in sorted(names):
            if name.endswith(EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), base))
    return found


def on_files(files: Files, config: Any) -> Files:
    root = os.path.dirname(os.path.abspath(config.config_file_path))
    for path in result_files(root):
        uri = f"{PUBLISHED}/{path.replace(os.sep, '/')}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=os.path.join(root, RESULTS, path)))
    return files
