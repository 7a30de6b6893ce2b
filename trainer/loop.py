"""The training step and loop for one process (the parallel layer adds ranks around it).

One optimizer step = `train.grad_accum` micro-batches: take packed samples from this rank's token
stream, build the batch (positions and masks per document), forward (main + MTP + balance losses),
backward the loss scaled by 1/grad_accum, then clip, check for non-finite values, AdamW step, and
the auxiliary-loss-free bias update from the step's expert loads (DeepSeek-V3 section 2.1.2:
after each step, every expert's bias moves by gamma toward balance). Checkpoints carry everything
needed for a bit-exact resume: model (with router biases), optimizer, step, RNG and data position.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from dataclasses import dataclass, field

import torch

from parallel import checkpoint as ckpt
from trainer import distributed as dist_run
from model.batch import make_batch
from trainer.config import Config, ConfigError, dump_yaml
from trainer.evaluate import maybe_validate
from trainer.flops import flops_per_token
from trainer.metrics import MetricsWriter, StepTimer, max_violation, peak_tflops
from model.transformer import build_model
from parallel.compile import apply_block_policies
from parallel.adamw import build_optimizer
from trainer.schedule import lr_at, set_lr

log = logging.getLogger("moepipe")


class NonFiniteError(RuntimeError):
    """Loss or gradients became NaN/inf and the config says to halt."""


@dataclass
class Run:
    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: object
    device: torch.device
    autocast_dtype: torch.dtype | None
    fp8_context: object = None       # () -> context manager around forward+backward (TE autocast)
    topology: object = None          # parallel.topology.Topology; None = one process
    zero: object = None              # parallel.data_parallel.ZeroAdamW when world > 1
    pipeline: object = None          # trainer.pipeline_run engine when parallel.pp > 1
    dispatcher: object = None        # parallel.expert.AllToAllDispatcher when parallel.ep > 1
    step: int = 0
    nan_skips: int = 0
    stop_requested: list = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.topology.rank if self.topology is not None else 0


def pick_device(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda': no CUDA device is visible; use train.device=cpu or auto")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return device, (torch.bfloat16 if dtype == "bf16" else None)


def build_run(cfg: Config, stream, topology=None, device: torch.device | None = None) -> Run:
    """Model and optimizer; with a multi-rank topology, experts sharded over ep and ZeRO-1
    (pp > 1: one model per rank holding its pipeline stages, see trainer.pipeline_run)."""
    if stream.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size}: the tokenizer in {cfg.data.output_dir} "
                          f"has {stream.vocab_size} tokens; set model.vocab_size >= {stream.vocab_size}")
    picked, autocast_dtype = pick_device(cfg)
    device = device or picked
    torch.manual_seed(cfg.train.seed)
    provider, fp8_context = fp8_provider(cfg)
    if topology is not None and topology.pp > 1:
        from trainer.pipeline_run import build_pipeline_run
        if cfg.train.compile or cfg.train.recompute == "selective":
            raise ConfigError(f"train.compile = {cfg.train.compile}, train.recompute = {cfg.train.recompute!r}: "
                              "pipeline stages (parallel.pp > 1) support recompute none or full (whole pieces, "
                              "never an all-to-all) and no compile yet; set train.compile=false and "
                              "train.recompute=full or none")
        return build_pipeline_run(cfg, stream, topology, device, autocast_dtype, provider, fp8_context)
    model = build_model(cfg, provider=provider).to(device)
    if topology is None or topology.world_size == 1:
        apply_block_policies(model, cfg.train, device)
        return Run(cfg, model, build_optimizer(model, cfg.optim), stream, device, autocast_dtype, fp8_context)
    zero, dispatcher = dist_run.parallelize(model, cfg, topology)
    apply_block_policies(model, cfg.train, device)
    return Run(cfg, model, None, stream, device, autocast_dtype, fp8_context, topology=topology, zero=zero,
               dispatcher=dispatcher)


def fp8_provider(cfg: Config):
    """(LayerProvider, autocast factory) for fp8.*; (None, None) when FP8 is off. A requested
    backend that cannot run raises (never a silent fall back to BF16)."""
    if not cfg.fp8.enabled:
        return None, None
    from parallel.fp8 import FP8BackendError, autocast_context, make_provider, select_backend
    try:
        selection = select_backend(cfg.fp8)
    except FP8BackendError as e:
        raise ConfigError(str(e)) from None
    log.info("fp8: backend %s, recipe %s (%s)", selection.backend, cfg.fp8.recipe, selection.why)
    provider = make_provider(cfg.fp8, cfg.model.num_layers, backend=selection.backend)
    return provider, lambda: autocast_context(cfg.fp8, backend=selection.backend)


def forward_backward(run: Run) -> dict:
    """All micro-batches of one step; returns summed metrics (losses averaged, counts summed)."""
    if run.pipeline is not None:
        return run.pipeline.forward_backward(run)
    cfg, accum = run.cfg, run.cfg.train.grad_accum
    keys = ("loss", "lm_loss", "mtp_loss", "balance_loss")
    sums, counts = None, None
    for micro in range(accum):
        if run.zero is not None and micro == accum - 1:
            run.zero.overlap_next_backward()  # reduce-scatter buckets while backward still runs
        tokens, doc_lens = run.stream.take(cfg.train.micro_batch_size)
        batch = make_batch(tokens, doc_lens, run.device)
        with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None), \
                (run.fp8_context() if run.fp8_context else contextlib.nullcontext()):
            out = run.model(batch)
        (out.loss / accum).backward()
        # summed on the device in float64 (the same arithmetic as Python floats): no host sync per micro-batch
        vals = torch.stack([getattr(out, key).detach().double() for key in keys]) / accum
        sums = vals if sums is None else sums + vals
        counts = out.expert_counts if counts is None else counts + out.expert_counts
    totals = dict(zip(keys, sums.tolist()))           # one host sync per step
    totals["expert_counts"] = counts
    return totals


def first_nonfinite_grad(model: torch.nn.Module) -> str | None:
    """The non-finite gradient closest to the loss (parameters walked from the output back), with
    how many others are non-finite: a NaN spreads backward, so the one nearest the loss is the lead."""
    bad = [name for name, p in reversed(list(model.named_parameters()))
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    if not bad:
        return None
    return bad[0] + (f" (and {len(bad) - 1} parameters before it)" if len(bad) > 1 else "")


def optimizer_step(run: Run, m: dict, lr: float) -> bool:
    """Reduce, clip, check, step, update router biases. Returns False when the step was skipped."""
    cfg = run.cfg
    if run.zero is None:
        set_lr(run.optimizer, lr)
        params = [p for p in run.model.parameters() if p.grad is not None]
        # summed in float64: fp32 sums of squares over large matrices drift by ~1e-4 relative
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float64)
                                                      for p in params]))
        m["grad_norm"] = float(total)
        if cfg.optim.grad_clip > 0 and math.isfinite(m["grad_norm"]):  # clip after the culprit is known
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.grad_clip, total)
    else:
        m["grad_norm"] = run.zero.reduce_and_norm()  # global: every rank decides alike below
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
        bad = [k for k in ("lm_loss", "mtp_loss", "balance_loss") if not math.isfinite(m[k])]
        where = f"losses {bad}" if bad else f"gradient of {first_nonfinite_grad(run.model)}"
        msg = f"non-finite value at step {run.step + 1}: {where} (loss={m['loss']}, grad_norm={m['grad_norm']})"
        if run.zero is not None:
            run.zero.discard()
        run.model.zero_grad(set_to_none=True)
        run.nan_skips += 1
        if cfg.train.on_nan == "halt":
            raise NonFiniteError(msg + "; halting (train.on_nan=skip drops such steps instead)")
        if run.nan_skips > cfg.train.max_nan_skips:
            raise NonFiniteError(f"{msg}; halting after {run.nan_skips} skipped steps, more than "
                                 f"train.max_nan_skips = {cfg.train.max_nan_skips}; lower optim.lr or check the data")
        log.warning("%s; skipping the step (%d skipped so far)", msg, run.nan_skips)
        return False
    if run.zero is None:
        run.optimizer.step()
    else:
        run.zero.apply(lr, m["grad_norm"])
    run.model.zero_grad(set_to_none=True)
    if m["expert_counts"] is not None:
        run.model.update_router_bias(m["expert_counts"])
    return True


def reduce_metrics(run: Run, m: dict) -> None:
    """Losses averaged over data-parallel ranks; expert loads summed over the whole world, so
    every rank applies the same bias update (and MaxVio is the global one)."""
    if run.topology is None or run.topology.world_size == 1:
        return
    from parallel.expert import global_expert_counts
    keys = ("loss", "lm_loss", "mtp_loss", "balance_loss")
    for key, value in zip(keys, dist_run.all_reduce_mean([m[k] for k in keys], run.topology, device=run.device)):
        m[key] = value
    if m["expert_counts"] is not None:
        m["expert_counts"] = global_expert_counts(m["expert_counts"], run.topology)
    if run.dispatcher is not None:  # all-to-all traffic of this step, summed over ranks
        stats = run.dispatcher.stats
        t = torch.tensor([float(stats.cross_node_bytes), float(stats.intra_node_bytes)], dtype=torch.float64,
                         device=run.device)
        torch.distributed.all_reduce(t)
        m["a2a_cross_node_MB"], m["a2a_intra_node_MB"] = t[0].item() / 2**20, t[1].item() / 2**20
        stats.reset()


def state_dict(run: Run) -> dict:
    """Everything but the tensors DCP holds in a multi-rank run."""
    state = {"step": run.step, "nan_skips": run.nan_skips, "rng": ckpt.rng_state(), "data": run.stream.state_dict()}
    if run.zero is None:
        state.update(model=run.model.state_dict(), optimizer=run.optimizer.state_dict())
    return state


def load_state(run: Run, path: str) -> None:
    if run.zero is None:
        state = ckpt.read_checkpoint(path)
        if "model" not in state:
            raise ckpt.CheckpointError(f"{path}: a multi-rank (DCP) checkpoint; resume it with torchrun "
                                       "(any dp x ep layout works)")
        run.model.load_state_dict(state["model"])
        if "optimizer" not in state:  # weights only (trainer.import_hf): continue pretraining from step 0
            log.info("%s holds weights only: fresh optimizer, data stream and step 0", path)
            return
        run.optimizer.load_state_dict(state["optimizer"])
    else:
        state = dist_run.load(path, run.model, run.zero, run.topology)
    run.stream.load_state_dict(state["data"])
    ckpt.set_rng_state(state["rng"])
    run.step, run.nan_skips = int(state["step"]), int(state["nan_skips"])


def resume_path(cfg: Config) -> str | None:
    where = cfg.checkpoint.resume
    if where == "none":
        return None
    if where == "auto":
        return ckpt.latest_checkpoint(os.path.join(cfg.train.output_dir, "checkpoints"))
    if not os.path.isdir(where):
        raise ConfigError(f"checkpoint.resume = {where!r}: no such checkpoint directory")
    return where


def install_stop_handlers(run: Run) -> None:
    """SIGTERM/SIGUSR1 (Slurm's warning before the time limit) and a first Ctrl-C (SIGINT): finish
    the step, save, stop (exit 75). A second Ctrl-C aborts at once (KeyboardInterrupt)."""
    def handler(signum, _frame):
        if signum == signal.SIGINT:
            if signal.SIGINT in run.stop_requested:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: will checkpoint after this step and stop (press Ctrl-C again to abort "
                        "without saving)")
        else:
            log.warning("received %s: will checkpoint after this step and stop", signal.Signals(signum).name)
        run.stop_requested.append(signum)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, handler)


def stop_agreed(run: Run) -> bool:
    """True when any rank got a stop signal (max over the world, so all ranks stop together)."""
    flag = 1.0 if run.stop_requested else 0.0
    if run.topology is not None and run.topology.world_size > 1:
        t = torch.tensor([flag], device=run.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flag = t.item()
    if flag and not run.stop_requested:
        run.stop_requested.append("peer")
    return bool(flag)


def save(run: Run, writer: ckpt.AsyncWriter | None) -> None:
    cfg = run.cfg
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    state = state_dict(run)
    if run.zero is not None:
        path = dist_run.save(root, run.step, run.model, run.zero, run.topology, state, dump_yaml(cfg),
                             cfg.checkpoint.keep_last)
        log.info("saved checkpoint %s", path)
        return
    if writer is None:
        path = ckpt.write_checkpoint(root, run.step, state, dump_yaml(cfg), cfg.checkpoint.keep_last)
        log.info("saved checkpoint %s", path)
        return
    state = _cpu_copy(state)  # training goes on mutating the live tensors
    writer.submit(root, run.step, state, dump_yaml(cfg), cfg.checkpoint.keep_last)


def _cpu_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def train(run: Run, metrics: MetricsWriter) -> Run:
    """The loop: steps until train.steps or a stop signal; checkpoints on schedule and at the end."""
    cfg = run.cfg
    dp = run.topology.dp if run.topology is not None else 1
    tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum * dp
    flops_tok, peak = flops_per_token(cfg), peak_tflops(cfg.logging.peak_tflops, run.device)
    writer = ckpt.AsyncWriter() if cfg.checkpoint.async_save and run.zero is None else None
    timer = StepTimer(run.device)
    saved = run.step  # a resumed run starts from a saved step
    try:
        while run.step < cfg.train.steps and not stop_agreed(run):
            lr = lr_at(run.step, cfg.optim, cfg.schedule, cfg.train.steps)
            timer.start()
            m = forward_backward(run)
            reduce_metrics(run, m)
            stepped = optimizer_step(run, m, lr)
            seconds = timer.stop()
            run.step += 1
            tps = tokens_per_step / seconds
            m.update(lr=lr, step_time=seconds, tokens_per_s=tps, tflops=tps * flops_tok / 1e12,
                     maxvio=max_violation(m["expert_counts"]), skipped=not stepped)
            m["mfu"] = m["tflops"] / peak if peak else None
            m.update(maybe_validate(run))
            metrics.write(run.step, cfg.train.steps, m)
            if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0 and run.step < cfg.train.steps:
                save(run, writer)
                saved = run.step
        if saved != run.step:
            save(run, writer)
    finally:
        if writer is not None:
            writer.wait()
    return run
