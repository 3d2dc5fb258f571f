"""A stand-in accelerator for testing device-generic code on a CPU-only machine.

Inside :func:`fake_device`, tensors made on (or moved to) the ``meta`` device are CPU tensors in a wrapper
that reports ``meta`` as its device, and every op runs on the wrapped CPU data, so values are real. What
CUDA refuses is refused here too: an op that mixes such tensors with CPU tensors (other than 0-dim ones,
copies between the devices, and CPU index tensors in advanced indexing, which CUDA accepts) raises
:class:`DeviceMismatch` naming the op, and ``.numpy()`` fails as on any non-CPU device. So a code path that
makes a tensor on the CPU where the model's device was meant fails here as it would on a GPU.

``meta`` is the device type used because PyTorch builds without CUDA still have its device guard (a
wrapper reporting ``cuda`` fails in PyTorch's own bindings before any op runs). Code under test must not
treat ``meta`` specially (the workbench does so only for streamed layers, which circuits do not use).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")


class DeviceMismatch(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A CPU tensor (``elem``) that reports :data:`DEVICE` as its device."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                   storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                   device=DEVICE, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def data_ptr(self) -> int:
        return self.elem.data_ptr()

    def untyped_storage(self):
        return self.elem.untyped_storage()

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("an OnDevice tensor was used outside fake_device()")


_COPIES = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}
_SCALARS = {"_local_scalar_dense", "equal", "is_nonzero"}


def _on_device(spec) -> bool:
    return spec is not None and torch.device(spec).type == DEVICE.type


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        ours, cpu = [], []

        def see(x):
            if isinstance(x, OnDevice):
                ours.append(x)
            elif isinstance(x, torch.Tensor) and x.device.type == DEVICE.type:
                # a real meta tensor, without data: PyTorch made it in C++ where no mode sees the factory
                raise RuntimeError(f"{func}: got a {DEVICE.type} tensor without data, made where fake_device() does "
                                   "not reach; teach fake_device that path")
            elif isinstance(x, torch.Tensor) and x.dim() > 0:
                cpu.append(x)
            return x

        tree_map(see, (args, kwargs))
        indexing = name in _INDEXING and isinstance(args[0], OnDevice) \
            and all(t.dtype in (torch.long, torch.int, torch.bool) for t in cpu)
        if ours and cpu and name not in _COPIES and not indexing:
            raise DeviceMismatch(f"{func}: tensors on {DEVICE.type} and on the CPU in one op "
                                 f"(CPU shapes {[tuple(t.shape) for t in cpu]})")
        to_device = _on_device(kwargs.get("device"))
        to_cpu = name == "_to_copy" and kwargs.get("device") is not None and not to_device
        a, k = tree_map(lambda x: x.elem if isinstance(x, OnDevice) else x, (args, kwargs))
        if to_device:
            k = {**k, "device": torch.device("cpu")}
        if name == "histc" and not a[0].is_floating_point():  # CUDA's takes integers (transformers' MoE on GPU)
            out = func(a[0].float(), *a[1:], **k).to(a[0].dtype)
        else:
            out = func(*a, **k)
        if name in _SCALARS:
            return out
        if name.endswith("_") and isinstance(args[0], OnDevice) and name != "_copy_from":
            return args[0]  # in place: the same wrapper
        wrap = to_device or (bool(ours) and not to_cpu)
        return tree_map(lambda x: OnDevice(x) if wrap and isinstance(x, torch.Tensor)
                        and not isinstance(x, OnDevice) else x, out)


class _Factories(TorchFunctionMode):
    """``torch.tensor`` / ``as_tensor`` / ``asarray`` onto the device: made on the CPU, then moved (a dispatched
    copy); ``tolist`` of a device tensor (which CUDA allows: a copy to the host); list indices as CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):  # (PyTorch refuses it for subclasses)
            return args[0].elem.tolist()
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], OnDevice):
            # list indices: PyTorch would make them on the device in C++ (no data here); CPU ones work on CUDA too
            def cpu_lists(i):
                return torch.tensor(i) if isinstance(i, list) else i
            index = args[1]
            index = tuple(cpu_lists(i) for i in index) if isinstance(index, tuple) else cpu_lists(index)
            return func(args[0], index, *args[2:], **kwargs)
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _on_device(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(DEVICE)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_device():
    """Inside: :data:`DEVICE` works as an accelerator whose tensors live on the CPU (see the module docstring)."""
    with _Dispatch(), _Factories():
        yield DEVICE


def to_fake_device(model: nn.Module) -> nn.Module:
    """Move ``model``'s parameters and buffers onto the fake device, in place (call inside :func:`fake_device`)."""
    for m in model.modules():
        for n, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[n] = nn.Parameter(OnDevice(p.detach()), requires_grad=p.requires_grad)
        for n, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[n] = OnDevice(b)
    return model
