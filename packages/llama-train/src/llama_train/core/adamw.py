"""PyTorch's AdamW, without importing torch._dynamo while nothing can be compiling.

`torch.optim.Optimizer` wraps `add_param_group`, `state_dict`, `load_state_dict`
and `zero_grad` in `torch._disable_dynamo`, and `step` in a guard that calls
`torch._dynamo.graph_break()`: the first call of either imports torch._dynamo,
about 1 s of CPU on an idle core (2.6-2.8 s on a busy one), which is most of the
start-up of a short run in its own process (a study point as a Slurm task). Both
wrappers only matter while dynamo traces the optimizer, and dynamo cannot be
tracing anything before it is imported. So each method here runs PyTorch's own
undecorated function while torch._dynamo is not in `sys.modules`, and PyTorch's
decorated method once it is (a compiled model, a test that compiled): the same
arithmetic in both cases, the same state dicts, an instance of
`torch.optim.AdamW` that checkpoints load into as before.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, _use_grad_for_differentiable

# PyTorch's functions under their dynamo wrappers (the optimizer's arithmetic is in
# torch.optim.adam, untouched). `unwrap` also looks through the profiling hook that
# an earlier optimizer's construction may have put on the class's `step`.
_STEP = inspect.unwrap(torch.optim.AdamW.step)
_GUARDED_STEP = _use_grad_for_differentiable(_STEP)


def _dynamo_loaded() -> bool:
    return "torch._dynamo" in sys.modules


def _unless_dynamo(name: str) -> Callable[..., Any]:
    """Optimizer.`name`: torch's decorated method once dynamo is loaded, before it the plain one."""
    decorated = getattr(Optimizer, name)
    plain = inspect.unwrap(decorated)

    def method(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
        return (decorated if _dynamo_loaded() else plain)(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = decorated.__doc__
    return method


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose construction and steps do not import torch._dynamo."""

    add_param_group = _unless_dynamo("add_param_group")
    state_dict = _unless_dynamo("state_dict")
    load_state_dict = _unless_dynamo("load_state_dict")
    zero_grad = _unless_dynamo("zero_grad")

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step: torch's own step, without the graph breaks when dynamo is absent."""
        if _dynamo_loaded():
            return _GUARDED_STEP(self, closure)
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return _STEP(self, closure)
