"""Profiler traces and memory snapshots on demand, and a memory report when a rank runs out.

`profile.steps: [a, b]` records steps a..b (inclusive) with torch.profiler and writes one
Chrome/Perfetto trace per rank to `output_dir/profile/rank_N_steps_a-b.json` (open it at
ui.perfetto.dev or chrome://tracing). Ranges are named after what ran: the model's pieces
(`model.layers.3.moe`, forward hooks installed only while recording) and, under pipeline
parallelism, every action of the schedule (`pipeline F3.0`, `pipeline Sact3.0->1`, set by
`parallel.pipeline.runtime`). `profile.memory_snapshot: true` also records the CUDA caching
allocator's history over the same steps and writes `memory_rank_N_steps_a-b.pickle` (drag it onto
pytorch.org/memory_viz); on CPU there is no such allocator, and the run says so once.

Without a restart: create `output_dir/PROFILE` (its content, if a number, is how many steps;
default 2); each rank sees it at its next step boundary and records from there. Touch it again
for another window.

Out of memory: `oom_report` writes `output_dir/hang/oom_rank_N.txt` (the error, where the rank
was, the bytes held by parameters, gradients and optimizer state, and the allocator's summary)
and, on CUDA, `oom_rank_N.pickle`, a snapshot of every allocated block.
"""
from __future__ import annotations

import logging
import os
import pickle
import resource
from dataclasses import dataclass

import torch
from torch import nn

from model.config import doc, require

log = logging.getLogger("moepipe")
DEFAULT_TOGGLE_STEPS = 2


@dataclass(kw_only=True)
class ProfileConfig:
    """torch.profiler traces and memory snapshots (see also the output_dir/PROFILE toggle)."""

    steps: list = doc([], "[a, b]: record steps a to b (inclusive) with torch.profiler; one Chrome/Perfetto trace per rank in output_dir/profile/. [] = none (touch output_dir/PROFILE to record the next 2 steps of a running job).")
    memory_snapshot: bool = doc(False, "With a profiled window: also write the CUDA allocator's history as a snapshot per rank (pytorch.org/memory_viz). CUDA only.")

    def __post_init__(self):
        ok = self.steps == [] or (len(self.steps) == 2 and all(isinstance(s, int) and not isinstance(s, bool)
                                                               for s in self.steps) and 1 <= self.steps[0] <= self.steps[1])
        require(ok, "steps", self.steps, "must be [] or [first, last] with 1 <= first <= last, e.g. [10, 11]")


class PieceRanges:
    """While installed, each call of a model piece (modules up to three names deep) is a profiler
    range named `model.<qualified name>`."""

    def __init__(self, model: nn.Module, depth: int = 3):
        self.handles, self.open = [], {}
        for name, module in model.named_modules():
            if name and name.count(".") < depth:
                self.handles.append(module.register_forward_pre_hook(self._enter(f"model.{name}")))
                self.handles.append(module.register_forward_hook(self._exit()))

    def _enter(self, label: str):
        def hook(module, _args):
            rf = torch.autograd.profiler.record_function(label)
            rf.__enter__()
            self.open.setdefault(id(module), []).append(rf)
        return hook

    def _exit(self):
        def hook(module, _args, _out):
            stack = self.open.get(id(module))
            if stack:
                stack.pop().__exit__(None, None, None)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class StepProfiler:
    """Starts and stops torch.profiler at step boundaries, from the config or the PROFILE file."""

    def __init__(self, cfg: ProfileConfig, output_dir: str, rank: int, model: nn.Module, cuda: bool):
        self.rank, self.model, self.cuda = rank, model, cuda
        self.out = os.path.join(output_dir, "profile")
        self.toggle = os.path.join(output_dir, "PROFILE")
        self.window = tuple(cfg.steps) or None
        self.memory = cfg.memory_snapshot and cuda
        self._toggle_seen = self._mtime()
        self._prof, self._pieces = None, None
        if cfg.memory_snapshot and not cuda and rank == 0:
            log.warning("profile.memory_snapshot = true: CUDA only (the caching allocator's history); this run is "
                        "on CPU, so no memory snapshot is written (traces still are)")

    def _mtime(self) -> float | None:
        try:
            return os.stat(self.toggle).st_mtime
        except OSError:
            return None

    def begin_step(self, step: int) -> None:
        mtime = self._mtime()
        if mtime is not None and mtime != self._toggle_seen and self._prof is None:
            self._toggle_seen = mtime
            self.window = (step, step + self._toggle_steps() - 1)
            if self.rank == 0:
                log.info("%s: profiling steps %d-%d", self.toggle, *self.window)
        if self._prof is None and self.window and self.window[0] == step:
            self._start()

    def _toggle_steps(self) -> int:
        try:
            with open(self.toggle, encoding="utf-8") as f:
                return max(int(f.read().strip() or DEFAULT_TOGGLE_STEPS), 1)
        except (OSError, ValueError):
            return DEFAULT_TOGGLE_STEPS

    def end_step(self, step: int) -> None:
        if self._prof is not None and step >= self.window[1]:
            self._stop()

    def close(self) -> None:
        if self._prof is not None:
            self._stop()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._pieces = PieceRanges(self.model)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False)
        self._prof.__enter__()

    def _stop(self) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self._pieces.remove()
        os.makedirs(self.out, exist_ok=True)
        a, b = self.window
        path = os.path.join(self.out, f"rank_{self.rank}_steps_{a}-{b}.json")
        prof.export_chrome_trace(path)
        if self.memory:
            torch.cuda.memory._dump_snapshot(os.path.join(self.out, f"memory_rank_{self.rank}_steps_{a}-{b}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0:
            log.info("profile of steps %d-%d: %s (one per rank; open in ui.perfetto.dev)", a, b,
                     os.path.join(self.out, f"rank_*_steps_{a}-{b}.json"))
        self.window = None


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def memory_breakdown(model: nn.Module, holder=None) -> list[str]:
    """Lines: bytes in parameters, gradients and the other tensors `holder` (the engine: optimizer
    state, fp32 masters, flat buffers) keeps, then the allocator's view."""
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    grads = {p.grad.data_ptr(): p.grad.numel() * p.grad.element_size() for p in model.parameters()
             if p.grad is not None}
    other = {t.data_ptr(): t.numel() * t.element_size() for t in held_tensors(holder)
             if t.data_ptr() not in params and t.data_ptr() not in grads}
    lines = [f"parameters        {_mib(sum(params.values()))}", f"gradients         {_mib(sum(grads.values()))}",
             f"optimizer state and other tensors of the engine  {_mib(sum(other.values()))}"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        lines += [f"CUDA allocated    {_mib(torch.cuda.memory_allocated())} (peak "
                  f"{_mib(torch.cuda.max_memory_allocated())}), reserved {_mib(torch.cuda.memory_reserved())}",
                  "", torch.cuda.memory_summary(abbreviated=True)]
    else:
        lines.append(f"process peak RSS  {_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")
    return lines


def held_tensors(obj, depth: int = 5, seen: set | None = None):
    """Tensors reachable from `obj` through dicts, lists and plain objects' attributes (not through
    modules: their parameters are counted apart), `depth` levels down."""
    seen = set() if seen is None else seen
    if obj is None or depth < 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from held_tensors(v, depth - 1, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from held_tensors(v, depth - 1, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for v in vars(obj).values():
            yield from held_tensors(v, depth - 1, seen)


def oom_report(error: BaseException, root: str, rank: int, where: str, model: nn.Module, holder=None) -> str:
    """Writes `root/oom_rank_N.txt` (and on CUDA a snapshot `oom_rank_N.pickle`); returns the text path."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"oom_rank_{rank}.txt")
    text = [f"rank {rank}: out of memory in {where}", " ".join(str(error).split()), ""]
    text += memory_breakdown(model, holder)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(os.path.join(root, f"oom_rank_{rank}.pickle"), "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
    return path
