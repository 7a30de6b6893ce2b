"""A test double around torch.distributed's collectives that records the device of every tensor.

`DeviceCheck(expected)` replaces the collectives of torch.distributed (and the module-level alias
in parallel/data_parallel.py) with wrappers that note (collective, device) for each tensor they
are handed and raise when one is not on `expected`, then call the real collective. Used with the
default device set to `meta`: a tensor built without `device=` (the host on a GPU run, where
NCCL refuses it) shows up as a meta tensor and is named at the call site that passed it.
`COLLECTIVES` is the list the AST test in tests/unit/test_collective_sites.py holds every call
site in parallel/ and trainer/ against.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# every torch.distributed function that moves tensors; object collectives carry no tensor
COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "send", "recv",
               "batch_isend_irecv", "all_gather", "reduce", "gather", "scatter", "all_to_all")
# checked inside batch_isend_irecv (P2POp accepts only the unwrapped functions)
P2P_OPS = ("isend", "irecv", "P2POp")
OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "barrier")


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    yield b
                elif isinstance(b, dist.P2POp):
                    yield b.tensor


class DeviceCheck:
    def __init__(self, expected: torch.device):
        self.expected, self.seen, self._saved = torch.device(expected), [], []

    def _wrap(self, name, fn):
        def checked(*args, **kwargs):
            for t in _tensors(args, kwargs):
                self.seen.append((name, t.device.type))
                if t.device != self.expected:
                    raise AssertionError(f"{name} got a tensor on {t.device}, expected {self.expected}")
            return fn(*args, **kwargs)
        return checked

    def __enter__(self):
        import parallel.data_parallel as dp
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved.append((dist, name, fn))
                setattr(dist, name, self._wrap(name, fn))
        self._saved.append((dp, "_all_gather_flat", dp._all_gather_flat))
        dp._all_gather_flat = self._wrap("all_gather_flat", dp._all_gather_flat)
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)

    def names(self) -> set[str]:
        return {name for name, _ in self.seen}
