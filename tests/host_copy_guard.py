"""A guard that fails a test when a tensor is copied to the host or between devices outside Triton's
interpreter: ``Tensor.numpy`` / ``.cpu`` / ``.tolist`` / ``__array__``, ``Tensor.to`` onto another
device, and ``torch.from_numpy`` / ``torch.as_tensor`` / ``torch.tensor`` of host data (a host to
device copy on a GPU). Calls made by Triton itself (its interpreter runs kernels on host copies of the
CPU tensors, which on a GPU are device memory) are allowed; so are scalar reads (``.item()``,
``int(t)``), which the torch module documents."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch


class HostCopyError(AssertionError):
    pass


def _inside_triton() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/triton/" in name or "\\triton\\" in name:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def no_host_copies() -> Iterator[list[str]]:
    """Inside the block, any host copy outside Triton raises ``HostCopyError``; the allowed calls made
    by Triton are counted in the yielded list."""
    allowed: list[str] = []
    tensor = torch.Tensor
    saved = {name: getattr(tensor, name) for name in ("numpy", "cpu", "tolist", "__array__", "to")}
    functions = {name: getattr(torch, name) for name in ("from_numpy", "as_tensor", "tensor")}

    def refuse(what: str):
        if _inside_triton():
            allowed.append(what)
            return
        raise HostCopyError(f"{what} inside a guarded step")

    def wrap(name):
        original = saved[name]

        def guarded(self, *args, **kwargs):
            refuse(f"Tensor.{name}")
            return original(self, *args, **kwargs)
        return guarded

    def guarded_to(self, *args, **kwargs):
        result = saved["to"](self, *args, **kwargs)
        if result.device != self.device:
            refuse(f"Tensor.to({result.device})")
        return result

    def wrap_function(name):
        original = functions[name]

        def guarded(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor) and not isinstance(data, (int, float, bool)):
                refuse(f"torch.{name}")
            return original(data, *args, **kwargs)
        return guarded

    try:
        for name in ("numpy", "cpu", "tolist", "__array__"):
            setattr(tensor, name, wrap(name))
        tensor.to = guarded_to
        for name in functions:
            setattr(torch, name, wrap_function(name))
        yield allowed
    finally:
        for name, fn in saved.items():
            setattr(tensor, name, fn)
        for name, fn in functions.items():
            setattr(torch, name, fn)
