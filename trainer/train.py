"""Entry point: `python -m trainer.train CONFIG [--set section.key=value ...]`.

Works as a plain process and under `torchrun --nproc-per-node 1`. Prepares the data if the
configured output directory is not prepared yet, resumes from the latest checkpoint in
`train.output_dir` (checkpoint.resume=auto), logs the fully resolved config first, then trains.
User errors (config, data, checkpoint) end with one clear line and exit code 2, not a traceback.
A run stopped by SIGTERM/SIGUSR1 checkpoints and exits 75 (EX_TEMPFAIL) so the launcher requeues it.
"""
from __future__ import annotations

import argparse
import logging
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
    from data.stream import stream_from_config
    from trainer.distributed import init_distributed
    from trainer.loop import build_run, install_stop_handlers, load_state, resume_path, train
    from trainer.metrics import MetricsWriter, setup_logging

    from trainer import preflight
    from trainer.run_dir import check_output_dir

    check_output_dir(cfg.train.output_dir)
    preflight.check_device(cfg)
    topology, device = init_distributed(cfg)
    preflight.check_memory(cfg, topology.world_size)
    setup_logging(cfg.train.output_dir, topology.rank)
    log.info("resolved config:\n%s", dump_yaml(cfg))
    log.info("layout: %s", topology.describe())
    stream = stream_from_config(cfg.data, cfg.dedup, rank=topology.dp_rank, world_size=topology.dp)
    run_ = build_run(cfg, stream, topology, device)
    path = resume_path(cfg)
    if path:
        preflight.check_model_matches(path, cfg)
        load_state(run_, path)
        log.info("resumed from %s at step %d", path, run_.step)
    install_stop_handlers(run_)
    n_params = sum(p.numel() for p in run_.model.parameters())
    log.info("model: %.2fM parameters on rank 0 (%s); training %d steps", n_params / 1e6, device, cfg.train.steps)
    metrics = MetricsWriter(cfg.train.output_dir, cfg.logging.every, cfg.logging.tensorboard,
                            enabled=topology.rank == 0)
    try:
        train(run_, metrics)
    finally:
        metrics.close()
    if run_.stop_requested and run_.step < cfg.train.steps:
        log.warning("stopped at step %d by a signal; checkpoint saved; exit %d asks for a requeue",
                    run_.step, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
