"""The training loop, the same for every layout: the engine (`parallel.engine`) knows the layout.

One optimizer step: `plan_step` asks `trainer.schedule.step_values` what the step runs with
(micro-batches per dp rank, lr, bias update speed, MTP and balance-loss weights: DeepSeek-V3
section 4.2 schedules them by tokens seen, the batch size included); take that many packed
micro-batches from this rank's token stream and build the batches (positions and masks per
document); the engine runs forward (main + MTP + balance losses) and backward, reduces the
gradients and returns their global norm; then the loop checks for non-finite values, has the
engine apply AdamW at the scheduled lr and applies the auxiliary-loss-free bias update from the
step's expert loads (section 2.1.2: after each step, every expert's bias moves by gamma toward
balance). Checkpoints (`parallel.checkpoint`) carry everything needed for a bit-exact resume:
model (with router biases), optimizer, step, tokens seen, RNG and data position, in one format
that every layout reads.
"""
from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import dataclass, field

import torch

from data.stream import TokenStream
from model.batch import make_batch
from parallel import checkpoint as ckpt
from parallel.checkpointer import Checkpointer
from parallel.engine import Engine, StepMetrics
from trainer.config import Config, dump_yaml
from trainer.diagnostics import Monitor
from trainer.errors import NonFiniteError
from trainer.evaluate import maybe_validate
from trainer.plan.flops import flops_per_token
from trainer.metrics import MetricsWriter, StepTimer, max_violation, peak_tflops
from trainer.schedule import Layout, StepValues, run_steps, step_values

log = logging.getLogger("moepipe")


@dataclass
class Run:
    cfg: Config
    engine: Engine
    stream: TokenStream
    step: int = 0
    tokens: int = 0          # tokens seen: sequences x data.seq_len of every step so far
    nan_skips: int = 0
    stop_requested: list[int | str] = field(default_factory=list)
    monitor: Monitor = field(default_factory=Monitor.off)  # heartbeat, watchdog, stragglers

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model


def take_batches(run: Run, n: int) -> list:
    """This rank's `n` micro-batches of the step."""
    cfg = run.cfg
    return [make_batch(*run.stream.take(cfg.train.micro_batch_size), run.engine.device) for _ in range(n)]


def total_steps(run: Run) -> int:
    """Steps of the whole run on this layout (train.steps, or fewer when train.tokens comes first)."""
    return run_steps(run.cfg, Layout.of(run.cfg, run.engine.topology.dp), run.tokens, run.step)


def plan_step(run: Run, total: int) -> StepValues:
    """The scheduled values of the next step, applied to the model (lr goes to `engine.apply`)."""
    v = step_values(run.cfg, run.step, run.tokens, Layout.of(run.cfg, run.engine.topology.dp), total)
    run.model.set_loss_weights(v.model["mtp_loss_weight"], v.model["seq_aux_loss_alpha"])
    return v


def schedule_row(v: StepValues, seq_len: int) -> dict:
    """The step's scheduled values for the metrics record."""
    return {"tokens": v.tokens_after(seq_len), "global_batch": v.global_batch, "grad_accum": v.grad_accum,
            "phase": v.phase, **v.model}


def first_nonfinite_grad(model: torch.nn.Module) -> str | None:
    """The non-finite gradient closest to the loss (parameters walked from the output back), with
    how many others are non-finite: a NaN spreads backward, so the one nearest the loss is the lead."""
    bad = [name for name, p in reversed(list(model.named_parameters()))
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    if not bad:
        return None
    return bad[0] + (f" (and {len(bad) - 1} parameters before it)" if len(bad) > 1 else "")


def optimizer_step(run: Run, m: StepMetrics, lr: float, gamma: float) -> tuple[float, bool]:
    """Reduce, check, step, update router biases. Returns (grad norm, whether the step was taken)."""
    cfg, engine = run.cfg, run.engine
    norm = engine.reduce_and_norm()  # global: every rank decides alike below
    if not (math.isfinite(m.loss) and math.isfinite(norm)):
        bad = [k for k in ("lm_loss", "mtp_loss", "balance_loss") if not math.isfinite(getattr(m, k))]
        where = f"losses {bad}" if bad else f"gradient of {first_nonfinite_grad(engine.model)}"
        msg = f"non-finite value at step {run.step + 1}: {where} (loss={m.loss}, grad_norm={norm})"
        engine.discard()
        run.nan_skips += 1
        if cfg.train.on_nan == "halt":
            raise NonFiniteError(msg + "; halting (train.on_nan=skip drops such steps instead)")
        if run.nan_skips > cfg.train.max_nan_skips:
            raise NonFiniteError(f"{msg}; halting after {run.nan_skips} skipped steps, more than "
                                 f"train.max_nan_skips = {cfg.train.max_nan_skips}; lower optim.lr or check the data")
        log.warning("%s; skipping the step (%d skipped so far)", msg, run.nan_skips)
        return norm, False
    engine.apply(lr)
    if m.expert_counts is not None:
        engine.model.update_router_bias(m.expert_counts, gamma)
    return norm, True


def small_state(run: Run) -> dict:
    """What a checkpoint holds besides the engine's tensors."""
    return {"step": run.step, "tokens": run.tokens, "nan_skips": run.nan_skips, "rng": ckpt.rng_state(),
            "data": run.stream.state_dict()}


def load_state(run: Run, path: str) -> None:
    state = ckpt.load(path, run.engine)
    if state is None:  # weights only (trainer.import_hf): continue pretraining from step 0
        log.info("%s holds weights only: fresh optimizer, data stream and step 0", path)
        return
    run.stream.load_state_dict(state["data"])
    ckpt.set_rng_state(state["rng"])
    run.step, run.nan_skips = int(state["step"]), int(state["nan_skips"])
    # checkpoints from before token schedules: every step took the same sequences
    run.tokens = int(state.get("tokens", state["data"]["consumed"] * run.cfg.data.seq_len))


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
    """True when any rank got a stop signal, so all ranks stop together."""
    agreed = run.engine.agree_stop(bool(run.stop_requested))
    if agreed and not run.stop_requested:
        run.stop_requested.append("peer")
    return agreed


def kill_after_step(step: int) -> None:
    """Crash test hook: MOEPIPE_KILL_AFTER_STEP=N sends SIGKILL to this process right after step N
    (and its checkpoint, if one is due) as if the machine died there."""
    if os.environ.get("MOEPIPE_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def train(run: Run, metrics: MetricsWriter) -> Run:
    """The loop: steps until the run's last step or a stop signal; checkpoints on schedule and at the end."""
    cfg, engine = run.cfg, run.engine
    flops_tok, peak = flops_per_token(cfg), peak_tflops(cfg.logging.peak_tflops, engine.device)
    saver = Checkpointer(os.path.join(cfg.train.output_dir, "checkpoints"), dump_yaml(cfg),
                              cfg.checkpoint.keep_last, engine.topology, cfg.checkpoint.async_save)
    timer = StepTimer(engine.device)
    saved = run.step  # a resumed run starts from a saved step
    total = total_steps(run)
    try:
        while run.step < total and not stop_agreed(run):
            v = plan_step(run, total)
            run.monitor.begin_step(run.step + 1)
            timer.start()
            batches = take_batches(run, v.grad_accum)
            run.monitor.phase("forward_backward")
            m = engine.reduce_metrics(engine.forward_backward(batches))
            run.monitor.phase("optimizer")
            grad_norm, stepped = optimizer_step(run, m, v.lr, v.model["bias_update_speed"])
            seconds = timer.stop()
            run.step, run.tokens = run.step + 1, v.tokens_after(cfg.data.seq_len)
            row_ranks = run.monitor.end_step(run.step, seconds)
            tps = v.global_batch * cfg.data.seq_len / seconds
            row = {"loss": m.loss, "lm_loss": m.lm_loss, "mtp_loss": m.mtp_loss, "balance_loss": m.balance_loss,
                   **m.comm, "grad_norm": grad_norm, "lr": v.lr, "step_time": seconds, "tokens_per_s": tps,
                   "tflops": tps * flops_tok / 1e12, "maxvio": max_violation(m.expert_counts), "skipped": not stepped,
                   "expert_counts": m.expert_counts, **schedule_row(v, cfg.data.seq_len)}
            if cfg.train.tokens:
                row["tokens_total"] = cfg.train.tokens
            row["mfu"] = row["tflops"] / peak if peak else None
            row.update(maybe_validate(run, total), **row_ranks)
            metrics.write(run.step, total, row)
            run.monitor.phase("checkpoint")
            if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0 and run.step < total:
                saver.save(run.step, engine.state_dict(), small_state(run))
                saved = run.step
            kill_after_step(run.step)
        if saved != run.step:
            saver.save(run.step, engine.state_dict(), small_state(run))
    finally:
        saver.wait()
    return run
