"""Backend choice for the reductions in ``workbench.kernels``: Triton or the plain-torch reference.

The backend comes from, in order: the op's ``backend=`` argument, the ``WORKBENCH_KERNELS``
environment variable, and ``auto``:

* ``auto`` (default): Triton for CUDA tensors when ``triton`` imports, the torch reference otherwise.
  This is the only choice that may fall back. (On CPU tensors the profile's ExpertAbsMax, TopK and
  Log2Histogram reducers run compiled loops instead, :mod:`workbench.kernels.cpu`, under ``auto`` only.)
* ``triton``: Triton, or a :class:`~workbench.errors.WorkbenchError` saying why not (``triton``
  does not import, or the tensor is on the CPU). With ``TRITON_INTERPRET=1`` in the environment
  Triton's interpreter runs the same kernels on CPU tensors (slow; that is how the tests run them).
* ``torch``: the reference, on any device.

Triton is imported lazily: kernels are written at module level next to their launcher and
reference, decorated with :func:`triton_jit`, and become real ``triton.jit`` functions on their
first launch. ``import workbench.kernels`` therefore works without Triton and never imports it.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from workbench.errors import WorkbenchError

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ENV = "WORKBENCH_KERNELS"

_triton: dict[str, Any] = {}  # "module", "language" or "error"; filled by the first import attempt
_interpreted: list[bool] = []  # how the kernels were materialised (interpreter or compiled), once known


def _import_triton() -> tuple[Any, Any] | None:
    if not _triton:
        try:
            import triton
            import triton.language as tl

            _triton.update(module=triton, language=tl)
        except Exception as e:  # a broken install raises more than ImportError
            _triton["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return (_triton["module"], _triton["language"]) if "module" in _triton else None


def triton_available() -> bool:
    """True when ``import triton`` works (attempted once, on first call)."""
    return _import_triton() is not None


def interpreter_enabled() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it (1/true/on)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def requested_backend(backend: str | None = None) -> str:
    choice = backend if backend is not None else os.environ.get(ENV, "auto")
    if not isinstance(choice, str):
        raise WorkbenchError(f"backend={choice!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        source = "backend" if backend is not None else ENV
        raise WorkbenchError(f"{source}={choice!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
    return choice


def backend_for(x: torch.Tensor, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"``: the backend an op would use for tensor ``x`` (see module doc)."""
    choice = requested_backend(backend)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise WorkbenchError(f"{ENV}=triton but triton does not import ({_triton['error']})")
    if x.is_cuda:
        return "triton"
    if not interpreter_enabled():
        raise WorkbenchError(f"{ENV}=triton needs a CUDA tensor, got one on {x.device.type}; set TRITON_INTERPRET=1 "
                             "to run the Triton interpreter on CPU, or use backend torch/auto")
    if _interpreted and not _interpreted[0]:
        raise WorkbenchError("the Triton kernels were already compiled for the GPU in this process; "
                             "TRITON_INTERPRET=1 must be set before their first launch to run them on CPU")
    return "triton"


def check_matrix(x: Any, name: str = "x") -> torch.Tensor:
    """Validate an [N, d] floating tensor (bf16, fp16 or fp32) entering a public op."""
    if not isinstance(x, torch.Tensor):
        raise WorkbenchError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise WorkbenchError(f"{name} must be 2-D [N, d], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise WorkbenchError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")
    return x


class _LazyKernel:
    """A ``@triton.jit`` function whose ``triton.jit`` (and ``import triton``) waits for its first launch.

    On that launch every lazy kernel of the defining module is jitted together and the module's
    globals are rebound to the real objects (``tl`` included), so kernels may call each other as
    Triton expects. Whether Triton's interpreter is used is decided then, by ``TRITON_INTERPRET``.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.real = None

    def _materialise(self):
        mods = _import_triton()
        if mods is None:
            raise WorkbenchError(f"triton does not import ({_triton['error']})")
        triton, tl = mods
        if interpreter_enabled():
            _interpretable_library()
        g = self.fn.__globals__
        g["tl"] = tl
        for name, v in list(g.items()):
            if isinstance(v, _LazyKernel):
                if v.real is None:
                    v.real = triton.jit(v.fn)
                g[name] = v.real
        if not _interpreted:
            _interpreted.append(interpreter_enabled())
        return self.real

    def __getitem__(self, grid):
        return (self.real or self._materialise())[grid]

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.fn.__name__} is a Triton kernel: launch it with {self.fn.__name__}[grid](...)")


def _interpretable_library() -> None:
    """Make Triton's own ``@triton.jit`` library (``tl.sum``, ``tl.max``, ``tl.zeros`` ...) interpretable.

    Triton decides at import time whether that library is compiled or interpreted, and
    ``torch._dynamo`` imports triton early, often before ``TRITON_INTERPRET=1`` is set; the
    interpreter then fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
    Rebind those functions to ``InterpretedFunction``s, as an import under the variable would have.
    """
    import sys

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import triton.language as tl

    swapped: dict[int, Any] = {}
    spaces = [m for n, m in list(sys.modules.items()) if n == "triton.language" or n.startswith("triton.language.")]
    for space in [*spaces, tl.core.tensor]:
        for name, value in list(vars(space).items()):
            if isinstance(value, JITFunction):
                setattr(space, name, swapped.setdefault(id(value), InterpretedFunction(value.fn)))


def triton_jit(fn: Callable) -> _LazyKernel:
    """Decorator: ``triton.jit`` deferred to the first launch (see :class:`_LazyKernel`)."""
    return _LazyKernel(fn)


def num_programs(device: torch.device, per_sm: int = 4, cpu: int = 4) -> int:
    """A grid size that fills the GPU (``per_sm`` programs per SM), or a small one for the interpreter."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return cpu


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
