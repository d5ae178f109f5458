"""The worker of test_torch's DDP test, in a module of its own: each spawned worker imports
this module (not the whole test module, with its hypothesis and framework imports), so that
on a loaded machine both reach the rendezvous about together."""

from __future__ import annotations

import datetime
import faulthandler
import os

import torch

from l2norm.torch import L2Norm


def ddp_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    # A hang shows where it is: each worker prints its stack and exits before the test's
    # deadline. One thread each: two workers share the CI machine's two cores.
    # Output goes to a file the test shows on failure: a worker writing into the pipe of
    # a piped pytest run has hung there.
    log = open(os.path.join(out_dir, f"worker{rank}.log"), "w")  # noqa: SIM115
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.dump_traceback_later(240, exit=True, file=log)
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{store}",  # no TCP port to pick and race for
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=180),
    )
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), L2Norm(8))
        x, g = torch.randn(4, 3, 5, 5), torch.randn(4, 8, 5, 5)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        part = slice(rank * 2, rank * 2 + 2)
        (ddp(x[part]) * g[part]).sum().mul(world).backward()  # DDP averages over ranks
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, "ddp.pt"))
    finally:
        torch.distributed.destroy_process_group()
