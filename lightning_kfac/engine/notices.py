"""Warnings that point at the user's code: the first frame outside lightning_kfac, torch and
Lightning, so ``file:line`` in the message is where the user called in (not
``torch/utils/_contextlib.py``)."""

from __future__ import annotations

import os
import sys
import warnings

_LIBRARY_DIRS = tuple(
    os.sep + name + os.sep for name in ("lightning_kfac", "torch", "pytorch_lightning", "lightning", "lightning_fabric")
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    frame = sys._getframe(1)
    level = 1
    while frame is not None and any(d in frame.f_code.co_filename for d in _LIBRARY_DIRS):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level + 1)
