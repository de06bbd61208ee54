"""Multi-process training under torchrun: process group set-up, stream sharding and reductions.

Under `torchrun`, every process (rank) trains on its own share of the B corpus streams;
DistributedDataParallel averages the gradients, so W ranks with B/W streams each take the same
steps as one process with B streams. Only rank 0 writes checkpoints, metrics and progress.
Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from charrnn.errors import UsageError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def setup(self, device_type: str) -> None:
        """Join the process group: NCCL for CUDA, gloo otherwise."""
        if not self.enabled or dist.is_initialized():
            return
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend=backend)

    def device(self, device: torch.device) -> torch.device:
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def check_batch(self, batch_size: int) -> int:
        """Streams per rank; the total batch must split evenly across ranks."""
        if batch_size % self.world:
            raise UsageError(
                f"--batch-size {batch_size} does not split evenly over {self.world} processes; "
                f"use a multiple of {self.world}"
            )
        return batch_size // self.world

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of the B streams."""
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    # ------------------------------------------------------------ reductions

    def _collective(self, values: list[float], op) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        op(t)
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        return self._collective(values, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def max(self, values: list[float]) -> list[float]:
        return self._collective(values, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's values, on every rank."""
        return self._collective(values, lambda t: dist.broadcast(t, src=0))

    def gather_rows(self, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The recurrent state of all ranks' streams, joined along the batch dimension (on every rank)."""
        if not self.enabled:
            return state
        out = []
        for s in state:
            s = s.contiguous()
            parts = [torch.empty_like(s) for _ in range(self.world)]
            dist.all_gather(parts, s)
            out.append(torch.cat(parts, dim=1))
        return tuple(out)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            try:  # every rank reaches the end before any tears its sockets down: a rank that leaves
                dist.barrier()  # while another still talks to it makes gloo abort the other (SIGABRT)
            except Exception:
                pass  # the group is already broken (a rank died): nothing left to wait for
            dist.destroy_process_group()


def broadcast_object(d: Dist, obj):
    """Rank 0's Python object (e.g. the run folder's name), on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
