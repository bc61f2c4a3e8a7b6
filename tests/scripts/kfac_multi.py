"""Multi-process kfac_ddp runs for ``tests/test_multinode.py`` (run as a script: Lightning's
launcher, or torchrun, starts the other ranks).

    kfac_multi.py --out DIR [--devices 2] [--num-nodes 1] [--resume CKPT] [--no-eval]

1. ``fresh``: the comparison run of ``kfac_lit.multi_run`` from scratch for 2 epochs (sanity
   check, validation every epoch with the module in train mode and autograd on, a checkpoint
   every epoch), then ``trainer.test`` and ``trainer.predict``; K-FAC collectives are counted by
   phase and per training batch.
2. ``resume`` (with ``--resume CKPT``): the same run resumed from CKPT, to the end of epoch 2.
3. ``amp`` (with ``--amp``): 16-mixed on CPU, the scaler skipping one optimizer step.

Writes ``DIR/{fresh,resume,amp}-rank<R>.pt``: final parameters, the full K-FAC state at the end
of training, probe results.
"""

from __future__ import annotations

import argparse
import os

import torch

import lightning_kfac
from lightning_kfac.testing.lightning import (
    ACCUMULATE,
    EvalProbe,
    FinalState,
    KFACCollectiveCounter,
    OverflowNet,
    StepWatch,
    SyntheticData,
    cpu_fp16_plugin,
    flat_params,
    multi_run,
    quiet_trainer,
)


def run(args, tag: str, ckpt_path: str | None, counter: KFACCollectiveCounter | None) -> None:
    probe, final = EvalProbe(counter), FinalState()
    model, data, trainer = multi_run(
        args.devices, os.path.join(args.out, tag), 2, [probe, final], num_nodes=args.num_nodes
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    result = {
        "params": flat_params(model),
        "kfac": final.state,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
    }
    if tag == "fresh" and not args.no_eval:
        trainer.test(model, datamodule=data, verbose=False)
        trainer.predict(model, datamodule=data)
    result.update(
        counts=dict(counter.counts) if counter else {},
        violations=probe.violations,
        eval_batches=probe.eval_batches,
        train_batch_collectives=probe.train_batch_collectives,
    )
    torch.save(result, os.path.join(args.out, f"{tag}-rank{trainer.global_rank}.pt"))


def run_amp_overflow(args) -> None:
    """16-mixed on CPU with an infinite loss in the first micro-batch of optimizer step 1: the
    scaler skips the step while this step's factor reductions are already in flight."""
    watch = StepWatch()
    model = OverflowNet(bad_batch=2, lr=0.1)
    trainer = quiet_trainer(
        strategy=lightning_kfac.KFACDDPStrategy(),
        callbacks=[lightning_kfac.KFACCallback(damping=1e-2, inv_update_freq=1, factor_decay=0.5, kl_clip=None), watch],
        plugins=[cpu_fp16_plugin()],
        devices=args.devices,
        num_nodes=args.num_nodes,
        max_steps=4,
        accumulate_grad_batches=ACCUMULATE,
    )
    trainer.fit(model, datamodule=SyntheticData(batch_size=8, n=128))
    torch.save(
        {
            "seen": watch.seen,
            "discarded": trainer.strategy.discarded_steps,
            "global_step": trainer.global_step,
            "params": flat_params(model),
        },
        os.path.join(args.out, f"amp-rank{trainer.global_rank}.pt"),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--amp", action="store_true", help="also the 16-mixed overflow run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counter = KFACCollectiveCounter()
    counter.install()
    run(args, "fresh", None, counter)
    if args.resume:
        run(args, "resume", args.resume, None)
    if args.amp:
        run_amp_overflow(args)


if __name__ == "__main__":
    main()
