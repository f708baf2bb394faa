"""Data-parallel training on torch.distributed: which rank this process is, which micro-batches it runs, and
the few collectives the recipe needs. Gloo on the CPU, NCCL on GPUs; the processes are started by torchrun
(`torch.distributed.run`, see launch.py), which sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous.

Global batch semantics: one optimizer step is the spec's `gradient_accumulation_steps` micro-batches of
`micro_batch_size` rows, whatever the number of ranks. The micro-batches of a step are dealt round-robin to
the ranks (accumulation divided across ranks); every rank holds the whole (small, tokenized) dataset, so it
knows the step's global count of labelled tokens without communicating and divides its loss sum by it.
DDP (and FSDP's reduce-scatter) averages gradients over ranks, so each rank's loss is scaled by the world
size: the reduced gradient is then exactly the one-rank gradient of the step (up to float summation order).
Under DDP parameters, optimizer and scheduler stay identical on every rank; under FSDP (fsdp.py) each rank
holds a shard and a checkpoint gathers them whole. Either way rank 0 writes the one-rank format, which resumes
on any number of ranks and either strategy.

A rank that gets fewer micro-batches than another in a step (the last step of an epoch) runs a weight-0
copy of one, so every rank runs the same number of forward/backward passes and the collectives line up
(FSDP all-gathers in every forward, evaluation included).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from kubetune.errors import SpecError
from kubetune_trainer.progress import Log

RANK_SUMMARIES_ENV = "KUBETUNE_RANK_SUMMARIES"  # a folder where every rank writes its termination summary


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a plain run is 0 / 1 / 0)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def ranks_from_env(env: Mapping[str, str] | None = None) -> Ranks:
    env = os.environ if env is None else env
    values: dict[str, int] = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = env.get(name)
        try:
            values[name] = default if raw in (None, "") else int(raw)
        except ValueError:
            raise SpecError(f"environment {name}={raw!r}: must be an integer (torchrun sets it)") from None
    ranks = Ranks(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if ranks.world < 1 or not 0 <= ranks.rank < ranks.world or ranks.local_rank < 0:
        raise SpecError(f"environment RANK={ranks.rank} WORLD_SIZE={ranks.world} LOCAL_RANK={ranks.local_rank}: "
                        "need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return ranks


def micro_batches_of(count: int, ranks: Ranks) -> list[tuple[int, float]]:
    """(index, weight) of the micro-batches this rank runs out of the step's `count`: rank r takes r, r+N, …;
    a rank with fewer than the busiest rank pads with weight-0 copies of its first (or of micro-batch 0)."""
    if count < 1:
        raise ValueError(f"a step has at least one micro-batch, got {count}")
    mine = [(i, 1.0) for i in range(ranks.rank, count, ranks.world)]
    busiest = -(-count // ranks.world)
    filler = mine[0][0] if mine else 0
    return mine + [(filler, 0.0)] * (busiest - len(mine))


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init(ranks: Ranks, device_type: str, timeout_seconds: float = 1800) -> None:
    """Join the process group torchrun set up (MASTER_ADDR/PORT in the environment); no-op for one rank."""
    if not ranks.distributed:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device_type == "cuda":  # NCCL wants each rank's GPU current; gloo on the CPU runs everything else here
        torch.cuda.set_device(ranks.local_rank)  # (test_distributed.py; NCCL: its two-GPU test, bench/gpu_check.py)
    dist.init_process_group(backend_for(device_type), rank=ranks.rank, world_size=ranks.world,
                            timeout=timedelta(seconds=timeout_seconds))


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_of(ranks: Ranks, device: Any) -> Any:
    """On GPUs every rank uses the GPU of its local rank."""
    import torch

    if device.type == "cuda" and ranks.distributed:  # one GPU per rank; CPU ranks share the host (gloo tests)
        return torch.device("cuda", ranks.local_rank)
    return device


def wrap(module: Any, ranks: Ranks, device: Any, strategy: str = "ddp", layers: list[Any] | None = None) -> Any:
    """Several ranks: FSDP2 over `layers` and the module (strategy fsdp, see fsdp.py), else DDP."""
    if not ranks.distributed:
        return module
    if strategy == "fsdp":
        from kubetune_trainer import fsdp

        fsdp.shard(module, layers or [], device, ranks.world)
        return module
    return data_parallel(module, device)


def data_parallel(module: Any, device: Any) -> Any:
    """DistributedDataParallel over the trainable (LoRA) parameters; frozen base weights and buffers are
    neither broadcast nor reduced (they are loaded identically on every rank)."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    device_ids = [device.index] if device.type == "cuda" else None  # DDP's one device per rank; CPU: none
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False,
                                   find_unused_parameters=False)


def sync_context(module: Any, last: bool) -> Any:
    """Gradients are reduced once per optimizer step: on the last micro-batch, not on the others."""
    from torch.nn.parallel import DistributedDataParallel

    from kubetune_trainer import fsdp

    if isinstance(module, DistributedDataParallel) and not last:
        return module.no_sync()
    if fsdp.is_sharded(module):
        return fsdp.gradient_sync(module, enabled=last)
    return nullcontext()


def sum_across(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sum over ranks (float64), one small all-reduce."""
    if not ranks.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu()]


def gather_int(value: int, ranks: Ranks) -> list[int]:
    """Every rank's `value`, indexed by rank."""
    if not ranks.distributed:
        return [value]
    import torch
    import torch.distributed as dist

    mine = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    parts = [torch.zeros_like(mine) for _ in range(ranks.world)]
    dist.all_gather(parts, mine)
    return [int(p.item()) for p in parts]


def gather_objects(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's picklable `value`, indexed by rank (on every rank)."""
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def _collective_device() -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def process_group(ranks: Ranks, device_type: str) -> Iterator[Ranks]:
    init(ranks, device_type)
    try:
        yield ranks
    finally:
        if ranks.distributed:
            shutdown()


def rank_summary_path(ranks: Ranks, env: Mapping[str, str] | None = None) -> str | None:
    """Where a rank other than 0 writes its termination summary: the launcher's folder, else nowhere (rank 0
    alone writes the pod's termination log)."""
    folder = (os.environ if env is None else env).get(RANK_SUMMARIES_ENV)
    return os.path.join(folder, f"rank-{ranks.rank}.json") if folder else None


class RankLog(Log):
    """The log of a rank other than 0: only what went wrong, tagged with the rank (rank 0 tells the story)."""

    def __init__(self, rank: int, fmt: str | None = None) -> None:
        super().__init__(fmt=fmt)
        self.rank = rank

    def event(self, event: str, message: str = "", **fields: Any) -> None:
        if event in ("error", "traceback"):
            super().event(event, f"rank {self.rank}: {message}", rank=self.rank, **fields)

    def step(self, **_fields: Any) -> None:
        return
