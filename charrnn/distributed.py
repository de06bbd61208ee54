"""Multi-process training under torchrun: process group set-up, stream sharding and reductions.

Under `torchrun`, every process (rank) trains on its own share of the B corpus streams;
DistributedDataParallel averages the gradients, so W ranks with B/W streams each take the same
steps as one process with B streams. Only rank 0 writes checkpoints, metrics and progress.
Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op.

A failure on one rank must end the whole job, never hang it: every collective goes through
`Dist.guard`, which turns a lost peer (gloo: "Connection closed by peer", or the group's timeout)
into one `DistributedError` line, and `close` waits for the others only when this rank succeeded.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from charrnn.errors import DistributedError, UsageError

# How long a collective waits for the other ranks before the group gives up. Ranks wait while rank 0
# evaluates and writes a checkpoint, so this is minutes, not seconds; a dead rank is noticed at once
# anyway (its sockets close), this bounds only a rank that is stuck. torch's own defaults are 10
# (NCCL) and 30 (gloo) minutes.
TIMEOUT_S = 300


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
        """Join the process group: NCCL for CUDA tensors, gloo for CPU tensors (and for everything off CUDA).

        Under CUDA the group has both: the model's gradients and states travel over NCCL, while the
        small CPU reductions below (losses, stop flags) and `broadcast_object` need gloo, since an
        NCCL-only group refuses CPU tensors.
        """
        if not self.enabled or dist.is_initialized():
            return
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=TIMEOUT_S))

    @contextmanager
    def guard(self):
        """Run collectives; a rank that died or stopped answering becomes one DistributedError line."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:  # a RuntimeError too, but this rank's own problem
            raise
        except RuntimeError as e:  # gloo and NCCL report a lost peer as a plain RuntimeError
            if not self.enabled:
                raise
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            first = first.split("] ", 1)[-1].split(". This is typically")[0]  # drop gloo's source path and advice
            raise DistributedError(
                f"process {self.rank} of {self.world} lost contact with the other processes of this torchrun job "
                f"({first.strip()}): one of them failed or was killed, see its message or torchrun's report"
            ) from None

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
        t = torch.tensor(values, dtype=torch.float64)  # a CPU tensor: gloo carries it, under CUDA too
        with self.guard():
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
            with self.guard():
                dist.all_gather(parts, s)
            out.append(torch.cat(parts, dim=1))
        return tuple(out)

    def barrier(self) -> None:
        if self.enabled:
            with self.guard():
                dist.barrier()

    def close(self, ok: bool = True) -> None:
        """Leave the group. After a failure on this rank, leave at once: the others are not at a
        barrier but inside some other collective, which fails (and ends them) when this process's
        sockets close; waiting for them here would hang both sides."""
        if self.enabled and dist.is_initialized():
            if ok:
                try:  # every rank reaches the end before any tears its sockets down: a rank that leaves
                    dist.barrier()  # while another still talks to it makes gloo abort the other (SIGABRT)
                except RuntimeError:
                    pass  # the group is already broken (a rank died): nothing left to wait for
            dist.destroy_process_group()


def broadcast_object(d: Dist, obj):
    """Rank 0's JSON-able object (e.g. the run folder's name), on every rank.

    Sent as UTF-8 JSON in a uint8 tensor, its length first: torch's broadcast_object_list would
    pickle it and go through numpy, which a torch install need not have.
    """
    if not d.enabled:
        return obj
    data = json.dumps(obj).encode() if d.main else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    with d.guard():
        dist.broadcast(size, src=0)
        buf = torch.tensor(list(data), dtype=torch.uint8) if d.main else torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.tolist()).decode())
