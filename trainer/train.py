"""Entry point: `python -m trainer.train CONFIG [--set section.key=value ...]`.

Works as a plain process and under `torchrun --nproc-per-node 1`. Prepares the data if the
configured output directory is not prepared yet, resumes from the latest checkpoint in
`train.output_dir` (checkpoint.resume=auto), logs the fully resolved config first, then trains.
User errors (config, data, checkpoint) end with one clear line and exit code 2, not a traceback.
A run stopped by SIGTERM/SIGUSR1 or a first Ctrl-C (SIGINT) checkpoints and exits 75 (EX_TEMPFAIL) so the launcher requeues it.
A hang (no progress for fault.hang_seconds) or a dead peer dumps stacks to output_dir/hang/, names
the stuck rank in one line and also exits 75 (`trainer.diagnostics`).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys

import torch
import torch.distributed as dist

from trainer.cli import user_errors
from trainer.config import Config, ConfigError, dump_yaml, load_config, to_dict
from trainer.cpu_threads import set_cpu_threads
from trainer.evaluate import describe_validation
from trainer.restore import pick_device

log = logging.getLogger("moepipe")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; the launcher should requeue


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides, e.g. --set optim.lr=3e-4 moe.topk=6")
    return p.parse_args(argv)


@user_errors
def main(argv=None, cpu_threads: bool = False) -> int:
    """`cpu_threads`: choose the intra-op thread count for a CPU run (the command line does; a
    caller that runs training in its own process keeps its own setting)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        return run(cfg, cpu_threads)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, cpu_threads: bool = False) -> int:
    from trainer import preflight
    from trainer.run_dir import check_output_dir

    check_output_dir(cfg.train.output_dir)
    preflight.check_device(cfg)
    device, autocast_dtype = pick_device(cfg)
    topology = init_distributed(cfg, device)
    preflight.check_memory(cfg, topology.world_size)
    lock, previous = own_output_dir(cfg, topology, device)
    try:
        threads = set_cpu_threads() if cpu_threads and device.type == "cpu" else None
        return _run(cfg, topology, device, autocast_dtype, previous, threads)
    finally:
        if lock is not None:
            lock.release()



def init_distributed(cfg: Config, device: torch.device):
    """The process group (from the launcher's environment, when WORLD_SIZE > 1) and the topology
    that owns every group; a single process gets a topology with a world of one."""
    from parallel.topology import Topology
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.type == "cuda"
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("parallel.backend = 'nccl': needs CUDA devices; use parallel.backend=gloo on CPU")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        from parallel.fault import process_group_timeout_s, set_collective_environment
        from trainer.diagnostics import hang_dir
        set_collective_environment(hang_dir(cfg.train.output_dir), cuda=backend == "nccl")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=process_group_timeout_s(cfg.fault)))
    try:
        return Topology.from_config(cfg.parallel, num_experts=cfg.moe.num_experts)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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


def build_run(cfg: Config, stream, topology, device: torch.device, autocast_dtype: torch.dtype | None):
    """The run: this layout's engine (model, optimizer, groups) over `stream`."""
    from parallel.engine import build_engine
    from trainer.loop import Run
    if stream.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size}: the tokenizer in {cfg.data.output_dir} "
                          f"has {stream.vocab_size} tokens; set model.vocab_size >= {stream.vocab_size}")
    torch.manual_seed(cfg.train.seed)
    provider, fp8_context = fp8_provider(cfg)
    try:
        engine = build_engine(cfg, topology, device, autocast_dtype, provider, fp8_context)
    except ValueError as e:  # a layout that cannot run this config, named by its fields
        raise ConfigError(str(e)) from None
    return Run(cfg, engine, stream)


def own_output_dir(cfg, topology, device):
    """Rank 0 takes the output-dir lock; every rank stops when it could not (one line from rank 0)."""
    from trainer.run_dir import RunDirError, RunDirLock
    lock, previous, error = None, None, None
    if topology.rank == 0:
        lock = RunDirLock(cfg.train.output_dir)
        try:
            previous = lock.acquire()
        except RunDirError as e:
            lock, error = None, e
    if topology.world_size > 1:
        flag = torch.tensor([1.0 if error else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and error is None:
            raise ConfigError(f"train.output_dir = {cfg.train.output_dir!r}: rank 0 could not take it; see rank 0")
    if error is not None:
        raise error
    return lock, previous


def _run(cfg, topology, device, autocast_dtype, previous_holder, threads: str | None = None) -> int:
    from data.stream import stream_from_config
    from trainer import init_from
    from trainer.loop import total_steps

    announce(cfg, topology, previous_holder, threads)
    stream = stream_from_config(cfg.data, cfg.dedup, rank=topology.dp_rank, world_size=topology.dp)
    run_ = build_run(cfg, stream, topology, device, autocast_dtype)
    coverage = describe_validation(cfg, stream.dirs[0])
    if coverage:
        log.info(coverage)
    path = resume(cfg, run_, topology)
    init_from.start_stage(run_, cfg, resumed=path)
    total = total_steps(run_)
    if run_.step >= total:
        log_complete(cfg, run_)
        return 0
    return train_to(cfg, run_, topology, device, total)


def announce(cfg, topology, previous_holder, threads: str | None) -> None:
    """The log files, the resolved config, the run's first lines; rank 0 removes what an
    interrupted save or prune left (safe: the output-dir lock proves their writers are gone)."""
    from parallel import checkpoint as ckpt
    from trainer.metrics import setup_logging

    setup_logging(cfg.train.output_dir, topology.rank)
    if previous_holder:
        log.warning("took over the output-dir lock of a run that is no longer alive (host %s, pid %s)",
                    previous_holder.get("host"), previous_holder.get("pid"))
    write_resolved_config(cfg, topology.rank)
    log.info("run: %s (config.yaml resolved, train.log, metrics.jsonl, checkpoints/)", cfg.train.output_dir)
    log.info("layout: %s", topology.describe())
    if threads:
        log.info(threads)
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    if topology.rank == 0:
        for name in ckpt.remove_partial(root):
            log.warning("removed %s, left by an interrupted save or prune", os.path.join(root, name))


def resume(cfg, run_, topology) -> str | None:
    """Load checkpoint.resume's checkpoint into the run (None when there is none); say what a
    changed schedule or optimizer setting means; an explicit older step starts a new branch."""
    from parallel import checkpoint as ckpt
    from trainer import preflight
    from trainer.loop import load_state

    path = ckpt.resume_path(cfg.checkpoint.resume, cfg.train.output_dir)
    if not path:
        return None
    preflight.check_model_matches(path, cfg)
    load_state(run_, path)
    log.info("resumed from %s at step %d", path, run_.step)
    if cfg.checkpoint.resume != "auto" and topology.rank == 0:
        aside = ckpt.start_branch(os.path.join(cfg.train.output_dir, "checkpoints"), path)
        if aside:
            log.warning("resumed from an older checkpoint: the later ones of the old branch were moved to %s "
                        "(kept, not deleted); pruning and checkpoint.resume=auto follow the new branch", aside)
    for warning in [preflight.schedule_change(path, cfg), *preflight.optimizer_changes(path, cfg)]:
        if warning:
            log.warning(warning)
    return path


def log_complete(cfg, run_) -> None:
    """A resumed run that has already reached its limit: say so, and how to train further."""
    from trainer.phases import format_tokens
    more = (f"train.tokens (e.g. --set train.tokens={format_tokens(2 * cfg.train.tokens)})" if cfg.train.tokens
            else f"train.steps (e.g. --set train.steps={2 * cfg.train.steps})")
    log.info("this run is complete: step %d of %s (%s tokens) in %s; to train further, raise %s, or start "
             "afresh in another train.output_dir", run_.step, describe_limit(cfg), format_tokens(run_.tokens),
             cfg.train.output_dir, more)


def train_to(cfg, run_, topology, device, total: int) -> int:
    """Train to `total` steps under the stop handlers and the monitor; 0, or EXIT_PREEMPTED when a
    signal stopped the run early (its checkpoint is saved)."""
    from trainer.diagnostics import Monitor
    from trainer.loop import install_stop_handlers, train
    from trainer.metrics import MetricsWriter

    previous_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    install_stop_handlers(run_)
    log.info("model: %s; training %d steps (%s)", describe_params(cfg, run_.model, topology), total,
             describe_limit(cfg))
    log_schedule(run_)
    metrics = MetricsWriter(cfg.train.output_dir, cfg.logging.every, cfg.logging.tensorboard,
                            enabled=topology.rank == 0, wandb=cfg.logging.wandb, config=to_dict(cfg))
    run_.monitor = Monitor.start(cfg, topology.rank, topology.world_size, device, EXIT_PREEMPTED, run_.model)
    try:
        train(run_, metrics)
        run_.monitor.close()  # plots and summary are no steps
        if topology.rank == 0:
            finish(cfg, run_, metrics)
    except Exception as e:
        run_.monitor.on_error(e, run_.engine)  # OOM: memory report; a dead peer: named, exit 75
        raise
    finally:
        run_.monitor.close()
        metrics.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if run_.stop_requested and run_.step < total:
        log.warning("stopped at step %d by a signal; checkpoint saved; exit %d asks for a requeue",
                    run_.step, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    return 0


def describe_params(cfg, model, topology) -> str:
    """The model's size, and rank 0's share of it when the layout splits the model."""
    from trainer.plan.flops import param_counts
    counts = param_counts(cfg)
    total = counts["main_total"] + counts["mtp_total"]
    here = sum(p.numel() for p in model.parameters())
    text = f"{total / 1e6:.2f}M parameters ({counts['main_activated'] / 1e6:.2f}M activated per token)"
    if here != total:
        text += f", {here / 1e6:.2f}M of them on rank 0 ({topology.describe().split(':', 1)[-1].strip()})"
    return text


def write_resolved_config(cfg, rank: int) -> None:
    """The fully resolved config into train.log and output_dir/config.yaml (rank 0), not the console."""
    if rank != 0:
        return
    text = dump_yaml(cfg)
    log.info("resolved config:\n%s", text, extra={"file_only": True})
    with open(os.path.join(cfg.train.output_dir, "config.yaml"), "w") as f:
        f.write(text)


def describe_limit(cfg) -> str:
    """What ends the run, in the config's words."""
    from trainer.phases import format_tokens
    parts = ([f"train.steps = {cfg.train.steps}"] if cfg.train.steps else []) + \
        ([f"train.tokens = {format_tokens(cfg.train.tokens)}"] if cfg.train.tokens else [])
    return " or ".join(parts)


def log_schedule(run_) -> None:
    """One line per phased field: its pieces in the report's units (nothing when none is phased)."""
    from trainer.phases import format_tokens
    from trainer.schedule import Layout, micro_batches
    cfg = run_.cfg
    lay = Layout.of(cfg, run_.engine.topology.dp)
    for name, pieces in cfg.schedule.phased.items():
        text = ", ".join((f"{p.a:g}" if p.constant else f"{p.a:g} -> {p.b:g} ({p.shape})") +
                         f" until {format_tokens(p.end)}" for p in pieces)
        log.info("schedule %s: %s", name, text)
        if name == "train.global_batch":
            low = micro_batches(pieces[0].a, lay) * lay.dp * lay.micro_batch_size
            if low > pieces[0].a:
                log.warning("train.global_batch starts at %g sequences, below this layout's smallest step "
                            "(%d micro-batches x dp %d x micro_batch_size %d = %d): steps take %d until the "
                            "schedule reaches it", pieces[0].a, lay.smallest, lay.dp, lay.micro_batch_size, low, low)


def finish(cfg, run_, metrics) -> None:
    """Plots of the run into output_dir/plots/ and the closing summary (rank 0)."""
    from parallel import checkpoint as ckpt
    metrics.flush()
    plots = []
    try:
        if cfg.logging.plots:
            from trainer.plot import plot_run
            plots = plot_run(cfg.train.output_dir)
    except (ImportError, FileNotFoundError) as e:
        log.warning("no plots: %s", e)
    validating = cfg.data.valid_fraction > 0 and cfg.eval.every
    metrics.summary(run_.step, ckpt.latest_checkpoint(os.path.join(cfg.train.output_dir, "checkpoints")), plots,
                    first_eval=cfg.eval.every if validating else None)


if __name__ == "__main__":
    sys.exit(main(cpu_threads=True))
