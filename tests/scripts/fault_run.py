"""A kfac_ddp run under torchrun that one rank dies in, for ``tests/test_process_faults.py``.

    torchrun --standalone --nproc_per_node=2 --max-restarts=1 fault_run.py --out DIR [--kill-at-step S]
    torchrun --standalone --nproc_per_node=2 fault_run.py --out DIR --resume CKPT

On its first attempt (TORCHELASTIC_RESTART_COUNT=0) rank 1 writes its process id to
``DIR/victim.pid`` when it reaches optimizer step S and waits to be killed. A restarted attempt
resumes from the newest epoch checkpoint in ``DIR/ckpt``. Each rank writes its final parameters
and K-FAC state to ``DIR/final-rank<R>.pt`` and the checkpoint it resumed from to
``DIR/resumed-from.txt``. A rank that finished ends its process groups before it exits
(:func:`end_process_groups`).
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import time

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from lightning_kfac.testing.lightning import FinalState, flat_params, multi_run

EPOCHS = 4


class Victim(pl.Callback):
    def __init__(self, out: str, step: int) -> None:
        self.out, self.step = out, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and trainer.global_rank == 1 and trainer.global_step == self.step:
            with open(os.path.join(self.out, "victim.pid.tmp"), "w") as f:
                f.write(str(os.getpid()))
            os.replace(os.path.join(self.out, "victim.pid.tmp"), os.path.join(self.out, "victim.pid"))
            time.sleep(120)  # the test kills this process


def newest_checkpoint(directory: str) -> str | None:
    paths = glob.glob(os.path.join(directory, "*.ckpt"))
    return max(paths, key=lambda p: int(p.rsplit("step=", 1)[1].split(".")[0])) if paths else None


def fresh_store_after_restart() -> None:
    """A restarted torchrun attempt reuses the agent's store, where gloo finds the dead
    attempt's addresses ("Connection refused"). Each attempt gets a store of its own instead,
    hosted by rank 0 on a port every rank derives from the restart count."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt > 0:
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 7 * attempt)


def main() -> None:
    fresh_store_after_restart()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    callbacks = [FinalState()]
    if args.kill_at_step is not None:
        callbacks.append(Victim(args.out, args.kill_at_step))
    ckpt_dir = os.path.join(args.out, "ckpt")
    ckpt_path = args.resume or newest_checkpoint(ckpt_dir)
    model, data, trainer = multi_run(2, args.out, EPOCHS, callbacks, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    if trainer.global_rank == 0:
        with open(os.path.join(args.out, "resumed-from.txt"), "w") as f:
            f.write(os.path.basename(ckpt_path) if ckpt_path else "")
    torch.save(
        {"params": flat_params(model), "kfac": callbacks[0].state, "global_step": trainer.global_step},
        os.path.join(args.out, f"final-rank{trainer.global_rank}.pt"),
    )


def gloo_worker_threads() -> int:
    """Worker threads of gloo process groups alive in this process (Linux; 0 elsewhere)."""
    if not os.path.isdir("/proc/self/task"):
        return 0
    count = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            count += f.read().strip() == "pt_gloo_runloop"
    return count


def end_process_groups() -> None:
    """Destroy every process group, and with them gloo's worker threads, while the interpreter is
    still whole.

    A gloo worker frees the collective it ran (and the tensors it held) only after waking the
    rank that waits for it. If the interpreter is finalizing by then, freeing a tensor made in
    Python needs the GIL; Python ends the thread instead (pthread_exit), the unwinding meets
    C++ code that must not throw, and the rank aborts with "terminate called without an active
    exception" after a run that succeeded. Under load that worker can lag long enough.
    Destroying a group joins its workers only once nothing else holds it, and the trainer (DDP's
    reducer, K-FAC's exchange) sits in reference cycles: hence the collection first. Only after
    success: with a rank gone, destroying could wait on work that never finishes.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    left = gloo_worker_threads()
    if left:
        raise RuntimeError(
            f"{left} gloo worker threads outlive the destroyed process groups: something still holds a "
            "group, and this rank may abort at exit"
        )


if __name__ == "__main__":
    main()
    end_process_groups()
