"""Two CPU processes around a gloo process group, for the tests that train under DDP."""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_two_ranks(worker: Callable[..., None], *args) -> None:
    """worker(rank, *args) in 2 processes of one thread each (a module-level function: it is pickled)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, worker, args), nprocs=2, join=True)


def _rank(rank: int, port: int, worker: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()
