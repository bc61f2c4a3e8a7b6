"""Run a function in N forked processes joined by a gloo process group, with a timeout (tests and benchmarks).

No Lightning launcher is involved, so nothing re-executes the pytest session, and a hung
collective fails the test after ``timeout`` seconds instead of hanging CI.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    fn: Callable, rank: int, world_size: int, port: int, threads: int, queue: Any, args: tuple, kwargs: dict
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        # plain bytes: tensors sent through a queue live in shared memory that dies with the child
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, threads: int = 1, **kwargs: Any
) -> list[Any]:
    """``fn(rank, world_size, *args, **kwargs)`` on every rank, each with ``threads`` intra-op
    threads; returns the results by rank. Forked, so the ranks share the caller's data."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, threads, queue, args, kwargs), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    except Exception as err:  # queue.Empty on timeout
        errors.append(f"no answer from every rank within {timeout}s ({err!r})")
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return [results[rank] for rank in range(world_size)]


#: the rendezvous variables an in-process Lightning run leaves behind: a launched child that
#: inherits them joins the wrong process group
LAUNCH_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_RANK",
    "NODE_RANK",
    "RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)


def launch_env(**extra: str) -> dict[str, str]:
    """This process's environment without :data:`LAUNCH_VARIABLES`, updated with ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(extra)
    return env
