"""Where and how models run: device choice, the teacher's forward pass, versions, DataLoaders."""

from __future__ import annotations

import contextlib
import platform
from typing import Any

import numpy as np
import torch

from kdcache.errors import KdcacheError
from kdcache.version import __version__


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise KdcacheError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(
            f"--device {name} asked for, but no CUDA device is available; use --device cpu"
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise KdcacheError(
                f"--device {name} asked for, but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KdcacheError(f"--device {name} asked for, but MPS is not available; use --device cpu")
    return device


def prepare_model(
    model: torch.nn.Module, device: torch.device, *, eval_mode: bool, compile: bool = False
) -> torch.nn.Module:
    """Move to ``device``; channels_last on GPU (faster convs), optional ``torch.compile``."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train(not eval_mode)
    if compile:
        model = torch.compile(model)
    return model


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU. On CPU nothing: fp32 keeps the replay tests bit-exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def teacher_logits(
    teacher: torch.nn.Module, images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """(B, 3, S, S) float32 -> (B, C) float32 logits on ``device``."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device):
        return teacher(images).float()


def topk_rows(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """(B, C) logits -> cache fields: topk_logits (B, K) fp16, topk_index (B, K), lse (B,) fp32."""
    top, index = logits.topk(k, dim=1)
    return {"topk_logits": top.half(), "topk_index": index, "lse": logits.logsumexp(1)}


class HostCopy:
    """Device tensors copied to host memory without blocking the caller.

    On CUDA the copies go to pinned buffers behind an event, queued after the work that made
    them; :meth:`numpy` waits for that event only. On CPU it is a plain view.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        first = next(iter(tensors.values()))
        self._event = None
        if first.device.type != "cuda":
            self._host = tensors
            return
        self._host = {
            name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for name, t in tensors.items()
        }
        self._event = torch.cuda.Event()
        self._event.record()

    def numpy(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        return {name: t.numpy() for name, t in self._host.items()}


def library_versions() -> dict[str, str]:
    import torchvision
    import zarr

    return {
        "kdcache": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def loader_kwargs(workers: int) -> dict[str, Any]:
    """DataLoader options for ``workers`` worker processes (0 = in the main process)."""
    if workers <= 0:
        return {"num_workers": 0}
    return {
        "num_workers": workers,
        "persistent_workers": False,
        "prefetch_factor": 4,
        "multiprocessing_context": "fork" if platform.system() == "Linux" else None,
    }
