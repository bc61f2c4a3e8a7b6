"""``lightning-kfac`` and ``python -m lightning_kfac``: the Lightning CLI with lightning_kfac
imported, so that ``trainer.strategy: kfac_ddp`` works in a config::

    lightning-kfac fit --config examples/configs/digits_mlp.yaml
    python -m lightning_kfac fit --config examples/configs/digits_mlp.yaml --trainer.max_epochs 5

It is :class:`pytorch_lightning.cli.LightningCLI` with the model and the data module chosen in
the config (``model: {class_path: ..., init_args: ...}``, likewise ``data``), every subcommand
(``fit``, ``validate``, ``test``, ``predict``) and option of the plain CLI, and two conveniences:
the current directory is importable (as under ``python -m``), so ``class_path`` entries can
name modules of the project you run it from, and the saved ``config.yaml`` of a run overwrites
the previous one in the same log directory.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def main(args: Any = None) -> None:
    """The console script: run the CLI on ``sys.argv[1:]`` (or ``args``)."""
    run_cli(args)


def run_cli(args: Any = None, run: bool = True, **cli_kwargs: Any):
    """Run the CLI; ``args`` (a list of strings or a dict) replaces ``sys.argv[1:]``; other
    keywords go to ``LightningCLI``. Returns the :class:`~pytorch_lightning.cli.LightningCLI`
    instance (its ``trainer``, ``model``, ``config``)."""
    import lightning_kfac  # noqa: F401  registers "kfac_ddp"

    try:
        from pytorch_lightning.cli import LightningCLI
    except ImportError as err:  # jsonargparse missing
        raise SystemExit(
            f"lightning-kfac needs the Lightning CLI's extra dependency: pip install 'jsonargparse[signatures]' ({err})"
        ) from None
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    cli_kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return LightningCLI(args=args, run=run, **cli_kwargs)


if __name__ == "__main__":  # pragma: no cover
    main()
