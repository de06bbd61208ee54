"""Where a run trains: the device, the process group under torchrun, and how a step runs in mixed precision."""

from __future__ import annotations

import platform

import torch

from charrnn.config import TrainConfig
from charrnn.distributed import Dist
from charrnn.errors import CheckpointError, UsageError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CheckpointError("--device mps was asked for, but MPS is not available here; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where the card supports it, else fp16. None on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX), per oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What a measured speed depends on besides the shape: the CPU, the torch build and the thread count."""
    return f"{cpu_name()} | torch {torch.__version__} | threads {torch.get_num_threads()}"


# A run's precision by name (kept in its RunState): the autocast dtype of its forward pass, None for plain fp32
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup_distributed(cfg: TrainConfig) -> tuple[torch.device, Dist]:
    """The device, and the process group when started by torchrun (one process per device or core)."""
    device = pick_device(cfg.device)
    dist = Dist.from_env()
    if dist.enabled:
        dist.check_batch(cfg.batch_size)
        if cfg.sentiment.unit:
            raise UsageError("--sentiment-unit runs in one process; start it without torchrun")
        dist.setup(device.type)
        device = dist.device(device)
    return device, dist


class Precision:
    """Autocast and, for fp16, the gradient scaler: the parts of a step that differ by precision.

    Whatever the precision, the weights, their gradients and the optimiser state stay fp32 (autocast
    casts copies for the forward pass), and the loss is computed in fp32. `name` is "fp32", "bf16"
    or "fp16" (charrnn/precision.py chooses it); None: CUDA's mixed precision, fp32 elsewhere.
    """

    def __init__(self, device: torch.device, name: str | None = None):
        self.device_type = device.type
        self.dtype = AUTOCAST_DTYPES[name] if name is not None else autocast_dtype(device)
        self.name = next(k for k, v in AUTOCAST_DTYPES.items() if v == self.dtype)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

    @property
    def skips_overflow(self) -> bool:
        """fp16: a non-finite gradient is an overflow that the scaler skips (and lowers its scale), as designed."""
        return self.scaler is not None

    def state_dict(self) -> dict | None:
        """fp16: the loss scale reached (and its growth count), which an exact resume needs; else None."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    @staticmethod
    def carried(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The state carried into the next window, detached and in fp32 whatever the kernels returned
        (exact: a bf16 or fp16 value is an fp32 one), so checkpoints and rollbacks hold one dtype."""
        return tuple(s.detach().float() for s in state)

    def backward(self, objective: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Gradients of `objective`, unscaled, so clipping and the norm see their true size."""
        if self.scaler is None:
            objective.backward()
            return
        self.scaler.scale(objective).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
