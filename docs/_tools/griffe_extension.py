"""A griffe extension for the API reference (``extensions:`` in ``mkdocs.yml``). Two things the
static reading of the source gets wrong for this package, put right after it is loaded:

* Sphinx roles. The docstrings write ``:class:`~lightning_kfac.KFACCallback```, which Markdown
  shows as literal text. Each role becomes a mkdocstrings cross-reference
  (``[`KFACCallback`][lightning_kfac.KFACCallback]``), resolved as Sphinx would: the target as
  written, then relative to the object, its class and its module. A target inside the package
  that resolves to nothing becomes a reference to the name as written, so that
  ``mkdocs build --strict`` fails on it ("Could not find cross-reference target"); a target
  outside the package (Lightning, torch) becomes plain code: this site has no inventory of other
  projects' docs.
* Defaults that are expressions. ``damping: float = hyperparameters.DEFAULTS["damping"]`` would
  show as that expression; the signature shows the value the import gives it (``0.03``), which
  is what a reader needs. Literal defaults are left as written.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

PACKAGE = "lightning_kfac"
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|obj|data|exc|const):`(~?)([\w.]+)(?:\(\))?`")


def _canonical(collection: Any, path: str) -> str | None:
    """The path where the object ``path`` names is defined (an imported name resolves to its
    definition, which is where the reference page renders it), or None when there is none."""
    try:
        obj = collection[path]
        return obj.final_target.path if obj.is_alias else obj.path
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _scopes(obj: griffe.Object) -> list[str]:
    """The paths a relative name is looked up in: the object, then each parent up to the package."""
    scopes: list[str] = []
    current: griffe.Object | None = obj
    while current is not None:
        scopes.append(current.path)
        current = current.parent  # type: ignore[assignment]
    return scopes


def resolve(collection: Any, obj: griffe.Object, target: str) -> str | None:
    """The full path ``target`` names from ``obj``'s docstring, or None when nothing matches."""
    for candidate in (target, *(f"{scope}.{target}" for scope in _scopes(obj))):
        path = _canonical(collection, candidate)
        if path is not None:
            return path
    return None


def rewrite(collection: Any, obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        short, target = match.group(1) == "~", match.group(2)
        shown = f"`{target.rsplit('.', 1)[-1] if short else target}`"
        path = resolve(collection, obj, target)
        if path is not None:
            return f"[{shown}][{path}]"
        if target.split(".")[0] in (PACKAGE, *_scope_names(obj)):
            return f"[{shown}][{target}]"  # unresolved inside the package: strict mode reports it
        return shown

    return ROLE.sub(replace, text)


def _scope_names(obj: griffe.Object) -> tuple[str, ...]:
    """Names a relative target inside the package may start with (members of the object's
    module and classes), so that a misspelt relative target is reported, not silently unlinked."""
    names: set[str] = set()
    for scope in (obj, obj.parent, obj.module):
        if scope is not None:
            names.update(scope.members)
    return tuple(names)


def _runtime(path: str) -> Any:
    """The object at the dotted ``path`` (module, then attributes), or None."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for name in parts[split:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None


def evaluate_defaults(function: griffe.Function) -> None:
    """Replace each default that is an expression by the value it has at run time."""
    if not any(isinstance(p.default, griffe.Expr) for p in function.parameters):
        return
    runtime = _runtime(function.path)
    try:
        signature = inspect.signature(runtime)
    except (TypeError, ValueError):
        return
    for parameter in function.parameters:
        value = signature.parameters.get(parameter.name)
        if isinstance(parameter.default, griffe.Expr) and value is not None and value.default is not value.empty:
            parameter.default = repr(value.default)


class LightningKFACDocs(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        self._walk(pkg, loader.modules_collection, set())

    def _walk(self, obj: griffe.Object, collection: Any, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = rewrite(collection, obj, obj.docstring.value)
        if obj.is_function:
            evaluate_defaults(obj)  # type: ignore[arg-type]
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, collection, seen)  # type: ignore[arg-type]
