"""bitsandbytes imported without the torch.compile calls it makes at import.

bitsandbytes 0.50 wraps four of its fallback kernels (`backends/default/ops.py`, used only by
devices that register none of their own; CUDA and the CPU do) in `torch.compile` when the module
loads. Compilation itself waits for the first call, but `torch.compile` imports TorchInductor at
once: about 1.5 s of CPU in every process that loads a quantised base (measured here: 7.7 s of
user CPU to import the training stack, 6.1 s without). Training workers and serving replicas
start on the critical path of a cold slot or replica, and on a small machine several start
together, so each pays it against the others.

While bitsandbytes loads, `torch.compile` returns the function as it is; bitsandbytes already
falls back to the plain function when compiling fails, so that is one of the paths it runs by
design, and no kernel this project uses goes through it. The real `torch.compile` is back as soon
as the import returns. Call `import_bitsandbytes()` before the first import of transformers'
models or peft, which import bitsandbytes themselves; once it is loaded the call does nothing.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()


def _as_is(model: Callable | None = None, **_: Any) -> Any:
    """torch.compile's two forms, compiling nothing: compile(fn) and compile(**options)(fn)."""
    return model if model is not None else (lambda fn: fn)


def import_bitsandbytes() -> None:
    if "bitsandbytes" in sys.modules:
        return
    import torch

    with _lock:
        real = torch.compile
        torch.compile = _as_is
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            pass  # not installed: whoever needs it says so when it is used
        finally:
            torch.compile = real
