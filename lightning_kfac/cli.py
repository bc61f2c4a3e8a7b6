"""``lightning-kfac`` and ``python -m lightning_kfac``: the Lightning CLI with lightning_kfac
imported, so that ``trainer.strategy: kfac_ddp`` works in a config::

    lightning-kfac fit --config examples/configs/digits_mlp.yaml
    python -m lightning_kfac fit --config examples/configs/digits_mlp.yaml --trainer.max_epochs 5

It is Lightning's ``LightningCLI`` with the model and the data module chosen in the config
(``model: {class_path: ..., init_args: ...}``, likewise ``data``), every subcommand (``fit``,
``validate``, ``test``, ``predict``) and option of the plain CLI, and three conveniences:

* both Lightning namespaces: when the model or data class named on the command line or in a
  ``--config`` file derives from ``lightning.pytorch`` (``import lightning as L``), the CLI of
  ``lightning.pytorch`` runs, otherwise the one of ``pytorch_lightning``; set
  ``LIGHTNING_KFAC_NAMESPACE=lightning.pytorch`` (or ``pytorch_lightning``) to choose;
* the current directory is importable (as under ``python -m``), so ``class_path`` entries can
  name modules of the project you run it from;
* the saved ``config.yaml`` of a run overwrites the previous one in the same log directory.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")
DESCRIPTION = (
    "lightning-kfac: Lightning's CLI with the kfac_ddp strategy registered (trainer.strategy: kfac_ddp). "
    "The Lightning namespace follows the model/data classes (lightning.pytorch when they derive from it, "
    "else pytorch_lightning; LIGHTNING_KFAC_NAMESPACE overrides)."
)


def main(args: Any = None) -> None:
    """The console script: run the CLI on ``sys.argv[1:]`` (or ``args``)."""
    run_cli(args)


def run_cli(args: Any = None, run: bool = True, **cli_kwargs: Any) -> Any:
    """Run the CLI; ``args`` (a list of strings or a dict) replaces ``sys.argv[1:]``; other
    keywords go to ``LightningCLI``. Returns the CLI instance (its ``trainer``, ``model``,
    ``config``)."""
    import lightning_kfac  # noqa: F401  registers "kfac_ddp" in every installed namespace

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    namespace = cli_namespace(args if args is not None else sys.argv[1:])
    try:
        lightning_cli = importlib.import_module(f"{namespace}.cli").LightningCLI
    except ImportError as err:  # jsonargparse missing
        raise SystemExit(
            f"lightning-kfac needs the Lightning CLI's extra dependency: pip install 'jsonargparse[signatures]' ({err})"
        ) from None
    cli_kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    cli_kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
    return lightning_cli(args=args, run=run, **cli_kwargs)


def cli_namespace(args: Any) -> str:
    """The Lightning namespace of the model and data classes ``args`` names (see the module
    docstring); ``pytorch_lightning`` when none is found or none derives from the other."""
    chosen = os.environ.get("LIGHTNING_KFAC_NAMESPACE")
    if chosen:
        if chosen not in NAMESPACES:
            raise SystemExit(f"LIGHTNING_KFAC_NAMESPACE must be one of {', '.join(NAMESPACES)}; got {chosen!r}")
        return chosen
    for class_path in _class_paths(args):
        if _derives_from_lightning_pytorch(class_path):
            return "lightning.pytorch"
    return "pytorch_lightning"


def _class_paths(args: Any) -> list[str]:
    """``model``/``data`` class paths in a dict of arguments, in ``--model X``/``--data X``
    options, and in the yaml files given with ``--config``."""
    if isinstance(args, dict):
        return _paths_in_config(args)
    paths: list[str] = []
    argv = [str(a) for a in args]
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        if key in ("--model", "--data", "--model.class_path", "--data.class_path"):
            paths.append(value)
        elif key == "--config":
            paths += _paths_in_file(value)
    return paths


def _paths_in_file(path: str) -> list[str]:
    try:
        import yaml

        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, ImportError, ValueError):
        return []
    return _paths_in_config(config) if isinstance(config, dict) else []


def _paths_in_config(config: dict[str, Any]) -> list[str]:
    paths = []
    for section in ("model", "data"):
        entry = config.get(section)
        if isinstance(entry, str):
            paths.append(entry)
        elif isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
            paths.append(entry["class_path"])
    return paths


def _derives_from_lightning_pytorch(class_path: str) -> bool:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        import lightning.pytorch as lp
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, (lp.LightningModule, lp.LightningDataModule))


if __name__ == "__main__":  # pragma: no cover
    main()
