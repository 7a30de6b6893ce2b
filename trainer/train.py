"""Entry point: `python -m trainer.train CONFIG [--set section.key=value ...]`.

Works as a plain process and under `torchrun --nproc-per-node 1`. Prepares the data if the
configured output directory is not prepared yet, resumes from the latest checkpoint in
`train.output_dir` (checkpoint.resume=auto), logs the fully resolved config first, then trains.
User errors (config, data, checkpoint) end with one clear line and exit code 2, not a traceback.
A run stopped by SIGTERM/SIGUSR1 or a first Ctrl-C (SIGINT) checkpoints and exits 75 (EX_TEMPFAIL) so the launcher requeues it.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from trainer.cli import user_errors
from trainer.config import dump_yaml, load_config

log = logging.getLogger("moepipe")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; the launcher should requeue


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides, e.g. --set optim.lr=3e-4 moe.topk=6")
    return p.parse_args(argv)


@user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        return run(cfg)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg) -> int:
    from trainer import preflight
    from trainer.distributed import init_distributed
    from trainer.run_dir import check_output_dir

    check_output_dir(cfg.train.output_dir)
    preflight.check_device(cfg)
    topology, device = init_distributed(cfg)
    preflight.check_memory(cfg, topology.world_size)
    lock, previous = own_output_dir(cfg, topology, device)
    try:
        return _run(cfg, topology, device, previous)
    finally:
        if lock is not None:
            lock.release()


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
        import torch
        flag = torch.tensor([1.0 if error else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and error is None:
            from trainer.config import ConfigError
            raise ConfigError(f"train.output_dir = {cfg.train.output_dir!r}: rank 0 could not take it; see rank 0")
    if error is not None:
        raise error
    return lock, previous


def _run(cfg, topology, device, previous_holder) -> int:
    from data.stream import stream_from_config
    from parallel import checkpoint as ckpt
    from trainer import preflight
    from trainer.loop import build_run, install_stop_handlers, load_state, resume_path, train
    from trainer.metrics import MetricsWriter, setup_logging

    setup_logging(cfg.train.output_dir, topology.rank)
    if previous_holder:
        log.warning("took over the output-dir lock of a run that is no longer alive (host %s, pid %s)",
                    previous_holder.get("host"), previous_holder.get("pid"))
    log.info("resolved config:\n%s", dump_yaml(cfg))
    log.info("layout: %s", topology.describe())
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    if topology.rank == 0:
        for name in ckpt.remove_partial(root):  # safe: the lock proves their writers are gone
            log.warning("removed %s, left by an interrupted save or prune", os.path.join(root, name))
    stream = stream_from_config(cfg.data, cfg.dedup, rank=topology.dp_rank, world_size=topology.dp)
    run_ = build_run(cfg, stream, topology, device)
    path = resume_path(cfg)
    if path:
        preflight.check_model_matches(path, cfg)
        load_state(run_, path)
        log.info("resumed from %s at step %d", path, run_.step)
        if cfg.checkpoint.resume != "auto" and topology.rank == 0:
            aside = ckpt.start_branch(root, path)
            if aside:
                log.warning("resumed from an older checkpoint: the later ones of the old branch were moved to %s "
                            "(kept, not deleted); pruning and checkpoint.resume=auto follow the new branch", aside)
        warning = preflight.schedule_change(path, cfg)
        if warning:
            log.warning(warning)
    if run_.step >= cfg.train.steps:
        log.info("this run is complete: step %d of train.steps = %d in %s; to train further, raise train.steps "
                 "(e.g. --set train.steps=%d), or start afresh in another train.output_dir", run_.step,
                 cfg.train.steps, cfg.train.output_dir, 2 * cfg.train.steps)
        return 0
    previous_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    install_stop_handlers(run_)
    n_params = sum(p.numel() for p in run_.model.parameters())
    log.info("model: %.2fM parameters on rank 0 (%s); training %d steps", n_params / 1e6, device, cfg.train.steps)
    metrics = MetricsWriter(cfg.train.output_dir, cfg.logging.every, cfg.logging.tensorboard,
                            enabled=topology.rank == 0)
    try:
        train(run_, metrics)
        if topology.rank == 0:
            finish(cfg, run_, metrics)
    finally:
        metrics.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if run_.stop_requested and run_.step < cfg.train.steps:
        log.warning("stopped at step %d by a signal; checkpoint saved; exit %d asks for a requeue",
                    run_.step, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    return 0


def finish(cfg, run_, metrics) -> None:
    """Plots of the run into output_dir/plots/ and the closing summary (rank 0)."""
    from trainer import checkpoint as ckpt
    from trainer.plot import plot_run
    metrics.flush()
    try:
        plots = plot_run(cfg.train.output_dir)
    except (ImportError, FileNotFoundError) as e:
        log.warning("no plots: %s", e)
        plots = []
    metrics.summary(run_.step, ckpt.latest_checkpoint(os.path.join(cfg.train.output_dir, "checkpoints")), plots)


if __name__ == "__main__":
    sys.exit(main())
