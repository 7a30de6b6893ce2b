"""Data parallelism with ZeRO-1: averaged gradients, AdamW state sharded over data-parallel ranks.

DeepSeek-V3 (arXiv 2412.19437, section 3.1) uses ZeRO-1 data parallelism (Rajbhandari et al.,
ZeRO stage 1): every dp rank keeps the full bf16/fp32 parameters but only 1/dp of the fp32
master copy and AdamW moments. Per step:
  1. gradients are reduce-scattered in buckets (flat buffers of `grad_reduce_dtype`, fp32 or bf16,
     issued asynchronously), so each rank receives the summed gradient of its shard only, upcast
     to fp32;
  2. the global gradient norm is the sum of every rank's shard norms, clipping scales all shards;
  3. each rank runs AdamW (`parallel.adamw.adamw_step_`, the single-process arithmetic) on its
     fp32 shard, then the shards are all-gathered back into the parameters in the parameters'
     dtype (bf16 with `train.param_dtype` bf16: `parallel.precision`).
The all-gather writes the parameters themselves: from the first gather on, a bucket's parameters
are views of one flat buffer of their dtype. It can be left in flight until the next forward
(`defer_gather`): every bucket is waited for by a forward pre-hook of each module that owns one
of them, just before that module first runs; `wait_params` finishes them all and is called by
anything else that reads parameters (checkpoints, validation, loading).
Dense parameters are replicated over the dp group; expert parameters (see `parallel.expert`)
only over the expert-data-parallel group (edp = dp / ep). Both are multiplied by `grad_scale`:
an expert's gradient already sums the tokens of its whole ep group, so the sum over edp is the sum
over all dp ranks, exactly like the dense parameters; 1/dp (the default) makes it the mean of
per-rank mean losses, 1.0 (the engines) the step's per-token loss, whose shares the ranks hold.

Legend: N elements of a bucket (padded to a multiple of the group size), s = N / group size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.expert import expert_shards
from parallel.adamw import adamw_step_
from parallel.precision import DTYPES
from parallel.sharded_state import FlatChunks

OPT_KEYS = ("master", "exp_avg", "exp_avg_sq")

# all_gather_into_tensor is deprecated (a FutureWarning on every call) where all_gather_single exists
def _all_gather_flat(*args, **kwargs):
    """Looked up at call time, so that a traced torch.distributed (parallel.heartbeat) sees it."""
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


@dataclass
class _Bucket:
    """Params flattened into one buffer; this rank owns [index * s, (index + 1) * s)."""

    params: list[tuple[str, nn.Parameter, int]]   # (name, param, offset in the flat buffer)
    numel: int                                    # padded N
    group: object
    size: int
    index: int
    weight_decay: float
    master: Tensor = None                         # fp32 shard [s]
    exp_avg: Tensor = None
    exp_avg_sq: Tensor = None
    grad: Tensor = None                           # reduced fp32 shard [s]
    work: object = None
    kind: str = "dp"                              # dp (dense) or edp (experts)
    grad_group: object = None                     # group of the overlapped reduce-scatter
    ready: int = 0                                # params whose final gradient arrived
    param_flat: Tensor = None                     # [N] the parameters' storage, once gathered into

    @property
    def shard(self) -> int:
        return self.numel // self.size

    def flat_params(self) -> Tensor:
        flat = torch.zeros(self.numel, dtype=torch.float32, device=self.params[0][1].device)
        for _, p, off in self.params:
            flat[off:off + p.numel()] = p.detach().reshape(-1).float()
        return flat

    def my_slice(self, flat: Tensor) -> Tensor:
        return flat[self.index * self.shard:(self.index + 1) * self.shard]


def _reduce_scatter(out: Tensor, flat: Tensor, group, async_op: bool):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, flat, group=group, async_op=async_op)


class ZeroAdamW:
    """ZeRO-1 sharded AdamW over a model's parameters; `step(lr)` returns the global grad norm."""

    def __init__(self, model: nn.Module, topology, *, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, grad_clip: float = 0.0, bucket_mb: float = 25.0,
                 moment_dtype: torch.dtype = torch.float32, grad_scale: float | None = None,
                 grad_reduce_dtype: torch.dtype = torch.float32):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb = {bucket_mb}: must be positive")
        self.topology, self.lr, self.betas, self.eps = topology, lr, betas, eps
        self.grad_clip, self.moment_dtype, self.step_count = grad_clip, moment_dtype, 0
        self.grad_reduce_dtype = grad_reduce_dtype
        self.deferred = False   # all-gathers left in flight until first use (defer_gather)
        self._pending: dict[int, tuple] = {}  # bucket index -> (work, sent shard)
        # factor on gradients before the reduce-scatter: 1/dp averages per-rank mean losses;
        # 1.0 sums losses that are already shares of the step's (`parallel.engine.base.with_step_counts`)
        self.grad_scale = 1.0 / topology.dp if grad_scale is None else grad_scale
        self._hooked, self._armed, self._next, self.launched_in_backward = False, False, 0, 0
        experts = expert_shards(model)
        spaces: dict[tuple[str, float], list] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            kind = "edp" if name in experts else "dp"
            wd = weight_decay if p.ndim >= 2 else 0.0   # same rule as parallel.adamw.param_groups
            spaces.setdefault((kind, wd), []).append((name, p))
        cap = max(1, int(bucket_mb * 2 ** 20 / 4))
        self.buckets: list[_Bucket] = []
        for (kind, wd), named in spaces.items():
            self.buckets.extend(self._make_buckets(list(reversed(named)), kind, wd, cap))
        for b in self.buckets:
            b.master = b.my_slice(b.flat_params()).clone()
            b.exp_avg = torch.zeros_like(b.master, dtype=moment_dtype)
            b.exp_avg_sq = torch.zeros_like(b.master, dtype=moment_dtype)

    @classmethod
    def from_config(cls, model: nn.Module, topology, optim_cfg, **kwargs) -> "ZeroAdamW":
        """From an `optim:` config section (lr, betas, eps, weight decay, clip, bf16 moments)."""
        o = optim_cfg
        return cls(model, topology, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                   grad_clip=o.grad_clip, moment_dtype=torch.bfloat16 if o.bf16_moments else torch.float32,
                   grad_reduce_dtype=DTYPES[o.grad_reduce_dtype], **kwargs)

    def _make_buckets(self, named, kind: str, wd: float, cap: int) -> list[_Bucket]:
        """Reverse registration order (roughly the order gradients appear in backward)."""
        group, size = self.topology.group(kind), self.topology.size(kind)
        index = self.topology.ranks(kind).index(self.topology.rank)
        out, cur, n = [], [], 0
        for name, p in named:
            if cur and n + p.numel() > cap:
                out.append(_Bucket(cur, math.ceil(n / size) * size, group, size, index, wd, kind=kind))
                cur, n = [], 0
            cur.append((name, p, n))
            n += p.numel()
        if cur:
            out.append(_Bucket(cur, math.ceil(n / size) * size, group, size, index, wd, kind=kind))
        return out

    # ---- gradients
    def overlap_next_backward(self) -> None:
        """Start each bucket's reduce-scatter during the next backward (call it before the last
        micro-batch's backward), as soon as every parameter of the bucket has its final gradient.

        Buckets are launched strictly in bucket order on every rank (one whose parameters got no
        gradient here holds back the ones after it until `reduce_gradients`), so collectives match
        across ranks even when routing differs; they run on the topology's `dp_grad` / `edp_grad`
        groups (same ranks as dp / edp, communicators of their own), so they never interleave
        with the expert all-to-alls issued by the same backward."""
        if not self._hooked:
            self._install_hooks()
            self._hooked = True
        self._armed, self._next = True, 0
        for b in self.buckets:
            b.ready = 0

    def _install_hooks(self) -> None:
        for b in self.buckets:
            b.grad_group = self.topology.group(f"{b.kind}_grad")
            for _, p, _ in b.params:
                p.register_post_accumulate_grad_hook(self._hook(b))

    def _hook(self, b: _Bucket):
        def on_grad(_p):
            if self._armed:
                b.ready += 1
                while self._next < len(self.buckets) and \
                        self.buckets[self._next].ready >= len(self.buckets[self._next].params):
                    self._launch(self.buckets[self._next])
                    self._next += 1
                    self.launched_in_backward += 1
        return on_grad

    def _launch(self, b: _Bucket) -> None:
        """Flatten this bucket's gradients (times `grad_scale`) into a `grad_reduce_dtype` buffer
        and start its reduce-scatter."""
        flat = torch.zeros(b.numel, dtype=self.grad_reduce_dtype, device=b.params[0][1].device)
        for _, p, off in b.params:
            if p.grad is not None:
                flat[off:off + p.numel()] = p.grad.reshape(-1)
        if self.grad_scale != 1.0:
            flat.mul_(self.grad_scale)
        if b.size == 1:
            b.grad, b.work = flat, None
        else:
            b.grad = torch.empty(b.shard, dtype=self.grad_reduce_dtype, device=flat.device)
            b.work = _reduce_scatter(b.grad, flat, b.grad_group or b.group, async_op=True)

    def reduce_gradients(self) -> None:
        """Reduce-scatter every bucket not yet launched during backward, then wait for all; the
        received shards are fp32 from here on."""
        self.wait_params()  # a bucket no module of the forward used: its parameters are current now
        start = self._next if self._armed else 0
        for b in self.buckets[start:]:
            self._launch(b)
        self._armed, self._next = False, 0
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
            b.grad = b.grad.float()

    def grad_norm(self) -> float:
        """Global L2 norm of the averaged gradients: shard norms summed over dp, then over pp."""
        sq = torch.zeros((), dtype=torch.float64, device=self.buckets[0].grad.device if self.buckets else "cpu")
        for b in self.buckets:  # on the gradients' device: NCCL reduces CUDA tensors only
            sq += b.grad.double().square().sum()
        for kind in ("dp", "pp"):
            if self.topology.size(kind) > 1:
                dist.all_reduce(sq, group=self.topology.group(kind))
        return math.sqrt(float(sq))

    # ---- step
    @torch.no_grad()
    def step(self, lr: float | None = None) -> float:
        """Reduce grads, clip, update my shards, all-gather parameters. Returns the grad norm."""
        norm = self.reduce_and_norm()
        self.apply(self.lr if lr is None else lr, norm)
        return norm

    @torch.no_grad()
    def reduce_and_norm(self) -> float:
        """First half of a step: reduce-scatter gradients and return the global norm (same on all
        ranks, so every rank takes the same decision when it is not finite)."""
        self.reduce_gradients()
        return self.grad_norm()

    @torch.no_grad()
    def apply(self, lr: float, norm: float) -> None:
        """Second half: clip by `norm`, AdamW on my shards, all-gather the parameters."""
        coef = 1.0
        if self.grad_clip > 0:
            coef = min(1.0, self.grad_clip / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
        self.step_count += 1
        bs = self.buckets
        grads = [b.grad.mul_(coef) if coef != 1.0 else b.grad for b in bs]
        adamw_step_([b.master for b in bs], grads, [b.exp_avg for b in bs], [b.exp_avg_sq for b in bs],
                    [b.weight_decay for b in bs], self.step_count, lr, self.betas[0], self.betas[1], self.eps)
        for b in bs:
            b.grad = None
        self._launch_gathers()
        if not self.deferred:
            self.wait_params()

    def discard(self) -> None:
        """Drop a reduced step (non-finite gradients): nothing is updated."""
        for b in self.buckets:
            b.grad = None

    # ---- parameters from the fp32 masters: all-gathered in the parameters' dtype
    def _launch_gathers(self) -> None:
        self.wait_params()
        for i in range(len(self.buckets)):
            self._launch_gather(i)

    def _launch_gather(self, i: int) -> None:
        b = self.buckets[i]
        flat = self._param_buffer(b)
        send = b.master.to(flat.dtype)  # the master itself when the parameters are fp32
        if b.size == 1:
            flat.copy_(send)
            self._pending[i] = (None, send)
        else:
            self._pending[i] = (_all_gather_flat(flat, send, group=b.group, async_op=True), send)

    @staticmethod
    def _param_buffer(b: _Bucket) -> Tensor:
        """The bucket's parameters as views of one flat buffer of their dtype (made at the first
        gather, after any cast of the parameters), so that the all-gather writes the parameters
        themselves: no second copy of the weights while it is in flight."""
        dtype = b.params[0][1].dtype
        assert all(p.dtype == dtype for _, p, _ in b.params), "a bucket's parameters share one dtype"
        flat = b.param_flat
        if flat is None or flat.dtype != dtype or any(  # first gather, or parameters re-cast or replaced
                p.data_ptr() != flat.data_ptr() + off * flat.element_size() for _, p, off in b.params):
            b.param_flat = torch.zeros(b.numel, dtype=dtype, device=b.master.device)
            with torch.no_grad():
                for _, p, off in b.params:
                    view = b.param_flat[off:off + p.numel()].view_as(p)
                    view.copy_(p.data)
                    p.data = view
        return b.param_flat

    def _finish_gather(self, i: int) -> None:
        work, _ = self._pending.pop(i)
        if work is not None:
            work.wait()

    def wait_params(self) -> None:
        """Finish every all-gather still in flight: the parameters are the masters' values."""
        for i in sorted(self._pending):
            self._finish_gather(i)

    def params_from_master(self) -> None:
        """Parameters := the fp32 masters (cast to the parameters' dtype), e.g. after a load; one
        bucket at a time, so that a load allocates one bucket's buffer, not the model's."""
        self.wait_params()
        for i in range(len(self.buckets)):
            self._launch_gather(i)
            self._finish_gather(i)

    def defer_gather(self, model: nn.Module) -> None:
        """Leave `apply`'s all-gathers in flight, overlapped with what runs until the next forward
        and that forward itself: a forward pre-hook on every module owning parameters of a bucket
        (tied weights: each owner) waits for that bucket before the module runs."""
        owner = {id(p): i for i, b in enumerate(self.buckets) for _, p, _ in b.params}
        for module in model.modules():
            mine = sorted({owner[id(p)] for p in module.parameters(recurse=False) if id(p) in owner})
            if mine:
                module.register_forward_pre_hook(self._before_forward(mine))
        self.deferred = True

    def _before_forward(self, buckets: list[int]):
        def hook(_module, _args):
            for i in buckets:
                if i in self._pending:
                    self._finish_gather(i)
        return hook

    def zero_grad(self, model: nn.Module | None = None) -> None:
        for b in self.buckets:
            for _, p, _ in b.params:
                p.grad = None

    # ---- checkpoint view: this rank's shard, as chunks of the global per-parameter tensors
    def shard_chunks(self, where: dict[str, tuple[tuple, int]], skip: set[str] = frozenset()) -> dict[str, FlatChunks]:
        """{"<name>.<master|exp_avg|exp_avg_sq>": FlatChunks} over the live shards (no copy) of every
        parameter this rank owns a part of. `where[name]`: (global shape, flat index of this rank's
        local parameter in the global one: nonzero for expert rows under ep); `skip`: names left
        out (a copy another rank writes)."""
        out: dict[str, FlatChunks] = {}
        for b in self.buckets:
            first = b.index * b.shard
            for name, p, off in b.params:
                lo, hi = max(off, first), min(off + p.numel(), first + b.shard)
                if lo >= hi or name in skip:
                    continue
                shape, start = where[name]
                for key in OPT_KEYS:
                    out[f"{name}.{key}"] = FlatChunks(getattr(b, key)[lo - first:hi - first], shape, start + lo - off)
        return out

    # ---- full per-parameter state (gathered over the bucket's group): for tests and tools only
    def full_state(self) -> dict[str, dict[str, Tensor]]:
        """{param name: {"exp_avg", "exp_avg_sq", "master"}} with the shapes of the local params."""
        out: dict[str, dict[str, Tensor]] = {}
        for b in self.buckets:
            full = {k: self._all_gather(b, getattr(b, k).float()) for k in ("master", "exp_avg", "exp_avg_sq")}
            for name, p, off in b.params:
                out[name] = {k: v[off:off + p.numel()].view_as(p).clone() for k, v in full.items()}
        return out

    def reset_from_params(self) -> None:
        """Fresh optimizer over the current parameters (after loading weights only)."""
        self.wait_params()
        self.step_count = 0
        for b in self.buckets:
            b.master.copy_(b.my_slice(b.flat_params()))
            b.exp_avg.zero_()
            b.exp_avg_sq.zero_()

    def load_full_state(self, state: dict[str, dict[str, Tensor]], step: int) -> None:
        """Inverse of `full_state`: keep my shard of every bucket (the parameters are left as they are)."""
        self.wait_params()
        self.step_count = step
        for b in self.buckets:
            for key in ("master", "exp_avg", "exp_avg_sq"):
                flat = torch.zeros(b.numel, dtype=torch.float32, device=b.master.device)
                for name, p, off in b.params:
                    flat[off:off + p.numel()] = state[name][key].reshape(-1).float()
                getattr(b, key).copy_(b.my_slice(flat))

    @staticmethod
    def _all_gather(b: _Bucket, shard: Tensor) -> Tensor:
        if b.size == 1:
            return shard.clone()
        flat = torch.empty(b.numel, dtype=shard.dtype, device=shard.device)
        _all_gather_flat(flat, shard.contiguous(), group=b.group)
        return flat

