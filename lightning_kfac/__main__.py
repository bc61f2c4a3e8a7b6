"""``python -m lightning_kfac``: the Lightning CLI with kfac_ddp registered (see lightning_kfac.cli)."""

from lightning_kfac.cli import main

if __name__ == "__main__":
    main()
