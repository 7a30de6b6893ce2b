"""Training engines: one per layout behind one protocol (`base.Engine`); `build_engine` picks it.

- `local.LocalEngine`: one process, plain autograd and AdamW;
- `zero.ZeroEngine`: data x expert parallelism with ZeRO-1 (DeepSeek-V3 section 3.1); with
  `parallel.overlap` on (ep > 1) its micro-batches run as overlapped F&B pairs (`paired`);
- `pipeline.PipelineEngine`: pipeline schedules (section 3.2.1) on top of the ZeRO engine.
"""
from __future__ import annotations

import logging

import torch

from model.provider import LayerProvider
from model.transformer import build_model
from parallel.adamw import build_optimizer
from parallel.compile import apply_block_policies
from parallel.data_parallel import ZeroAdamW
from parallel.engine.base import Engine, ForwardContext, StepMetrics, forward_context
from parallel.engine.local import LocalEngine
from parallel.engine.paired import PairedMicroBatches
from parallel.engine.pipeline import apply_stage_policies, build_pipeline_engine
from parallel.engine.zero import ZeroEngine
from parallel.expert import parallelize_experts
from parallel.pipeline.overlap import overlap_path
from parallel.precision import DTYPES, cast_params_
from parallel.topology import Topology

__all__ = ["Engine", "StepMetrics", "build_engine"]

log = logging.getLogger("moepipe")


def build_engine(cfg, topology: Topology, device: torch.device, autocast_dtype: torch.dtype | None = None,
                 provider: LayerProvider | None = None, fp8_context: ForwardContext | None = None) -> Engine:
    """The engine of this rank's layout: model (built with `cfg.train.seed`), optimizer, groups.
    Raises ValueError naming the fields when the layout cannot run this config."""
    make_context = forward_context(device, autocast_dtype, fp8_context)
    log.info("parallel.overlap = %s: %s", cfg.parallel.overlap, overlap_path(
        cfg.parallel.overlap_on(topology.ep), cfg.parallel.schedule, topology.pp, topology.ep))
    if topology.pp > 1:
        return build_pipeline_engine(cfg, topology, device, provider, make_context)
    model = build_model(cfg, provider=provider).to(device)
    param_dtype = DTYPES[cfg.train.param_dtype]
    if topology.world_size == 1:
        optimizer = build_optimizer(model, cfg.optim, master_weights=param_dtype != torch.float32)
        cast_params_(model, param_dtype)  # after the optimizer took its fp32 masters
        apply_block_policies(model, cfg.train, device)
        return LocalEngine(model, optimizer, topology, device, make_context, cfg.optim.grad_clip)
    dispatcher = None
    if topology.ep > 1:
        dispatcher = parallelize_experts(model, topology, node_limited=cfg.parallel.node_limited_dispatch)
    zero = ZeroAdamW.from_config(model, topology, cfg.optim, grad_scale=1.0)  # losses are shares: sum
    cast_params_(model, param_dtype)  # after ZeRO took its fp32 masters
    if not cfg.train.compile:  # a pre-hook inside a compiled block would break its graph
        zero.defer_gather(model)
    paired = None
    if cfg.parallel.overlap_on(topology.ep):  # the model runs in pieces: the pipeline's policies
        apply_stage_policies(model, cfg, device, split_w=False)
        paired = PairedMicroBatches(model, make_context, recompute=cfg.train.recompute == "full")
    else:
        apply_block_policies(model, cfg.train, device)
    return ZeroEngine(model, zero, topology, device, make_context, dispatcher, paired)
