"""Warnings that point at the user's code: the first frame outside lightning_kfac, torch and
Lightning, so ``file:line`` in the message is where the user called in (not
``torch/utils/_contextlib.py``)."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings


def _package_dirs() -> tuple[str, ...]:
    dirs = []
    for name in ("lightning_kfac", "torch", "pytorch_lightning", "lightning", "lightning_fabric"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            dirs.append(os.path.realpath(location) + os.sep)
    return tuple(dirs)


_LIBRARY_DIRS = _package_dirs()


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level + 1)
