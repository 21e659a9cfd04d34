"""Keeping quantizer state identical across data-parallel ranks (torch.distributed, NCCL or gloo).

DDP broadcasts parameters and buffers from rank 0 once, when it wraps the model, and keeps parameters
equal afterwards by averaging gradients. Quantizers initialise their range from the first batch each
rank sees, and a quantizer in "auto" mode also picks its sign mode from it (a Python attribute that no
broadcast reaches). `sync_quantizers` copies rank 0's complete quantizer state, Python attributes
included, to every rank; `replica_fingerprint` lets a run check that the ranks still agree.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from ddq.optim import QUANTIZER_TYPES


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sync_quantizers(model: nn.Module, src: int = 0) -> int:
    """Broadcast every quantizer's parameters and buffers from rank `src`, then restore the Python state
    derived from them (sign mode, initialised flag) through the quantizers' load_state_dict hooks.
    Call it after the quantizers initialised (one forward) and before wrapping in DDP. Returns the number
    of quantizers synchronised (0 without a process group: nothing to do)."""
    quantizers = [m for m in model.modules() if isinstance(m, QUANTIZER_TYPES)]
    if not is_distributed():
        return 0
    for quantizer in quantizers:
        for tensor in list(quantizer.parameters(recurse=False)) + list(quantizer.buffers(recurse=False)):
            dist.broadcast(tensor.data, src)
        quantizer.load_state_dict(quantizer.state_dict())
    return len(quantizers)


@torch.no_grad()
def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Broadcast every buffer (e.g. BatchNorm running statistics, which each rank updates from its own
    last batch) from rank `src`, so evaluation and checkpoints see one model."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src)


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the names and exact bytes of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_objects(value: object) -> list[object]:
    """Every rank's `value` in rank order (a one-element list without a process group)."""
    if not is_distributed():
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
