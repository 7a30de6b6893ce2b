"""Device check: a whole training step through the expert all-to-all on a world of one, FP8 on.

The expert-parallel path only runs under a process group, and the mistakes it can hide (a host
tensor handed to NCCL, a dtype the FP8 kernels refuse) only show on a real backend. This builds
a process group of one (NCCL on CUDA, gloo on CPU), gives the topology that world as every group
and installs the all-to-all dispatcher forced through its exchanges even at ep = 1
(`parallelize_experts(..., force_exchange=True)`). One step (forward, backward, AdamW) runs
under the forward context of a training run (bf16 autocast on CUDA, FP8 when `--fp8`), every
all-to-all is counted and its tensors' devices checked, and the first loss is compared with the
same model on the single-rank dispatcher. One table row; `--out FILE` appends it there.

    python benchmarks/device_step.py [--device cuda|cpu] [--fp8 RECIPE|auto|off] [--out FILE] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.batch import make_batch  # noqa: E402
from model.transformer import build_model  # noqa: E402
from parallel.adamw import build_optimizer  # noqa: E402
from parallel.config import ParallelConfig  # noqa: E402
from parallel.engine.base import forward_context  # noqa: E402
from parallel.expert import parallelize_experts  # noqa: E402
from parallel.topology import GROUP_KINDS, OWN_GROUP_KINDS, Topology  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.train import fp8_provider  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ("| device | backend | fp8 | loss (all-to-all) | loss (local) | relative difference | all-to-alls | "
          "tensor devices | step ms |\n|" + "---|" * 9)


class CountingAllToAll:
    """Stands in for dist.all_to_all_single: counts calls, records the devices of their tensors."""

    def __init__(self):
        self.calls, self.devices, self.inner = 0, set(), dist.all_to_all_single

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.devices |= {a.device.type for a in args[:2] if isinstance(a, torch.Tensor)}
        return self.inner(*args, **kwargs)

    def __enter__(self):
        dist.all_to_all_single = self
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.inner


def world_of_one(device: torch.device) -> Topology:
    """A process group of one on `device`'s backend; the topology's every group is that world."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    topo = Topology.from_config(ParallelConfig(), world_size=1, rank=0)
    topo.groups = {kind: dist.group.WORLD for kind in (*GROUP_KINDS, *OWN_GROUP_KINDS)}
    return topo


def one_step(cfg, device, topo: Topology | None, batch) -> tuple[float, float]:
    """(first loss, step seconds) of forward + backward + AdamW; all-to-all dispatch when `topo`."""
    torch.manual_seed(cfg.train.seed)
    provider, fp8_context = fp8_provider(cfg)
    model = build_model(cfg, provider=provider).to(device)
    if topo is not None:
        parallelize_experts(model, topo, force_exchange=True)
    optimizer = build_optimizer(model, cfg.optim)
    context = forward_context(device, torch.bfloat16 if device.type == "cuda" else None, fp8_context)
    with context():                       # warm-up (lazy init, compiled kernels), not timed
        model(batch).loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with context():
        loss = model(batch).loss
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item(), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp8", default="rowwise", help="fp8 recipe on the torch backend, 'auto' or 'off'")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    fp8 = {"off": ["fp8.enabled=false"], "auto": ["fp8.enabled=true"]}.get(
        args.fp8, ["fp8.enabled=true", "fp8.backend=torch", f"fp8.recipe={args.fp8}"])
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      ["mtp.depth=1", "train.micro_batch_size=2", "data.seq_len=128", "model.vocab_size=512",
                       "data.tokenizer=bpe:512", *fp8, *args.set])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=g)
    batch = make_batch(tokens, [[cfg.data.seq_len // 2, cfg.data.seq_len // 2]] * cfg.train.micro_batch_size, device)
    local_loss, _ = one_step(cfg, device, None, batch)
    topo = world_of_one(device)
    try:
        with CountingAllToAll() as a2a:
            loss, seconds = one_step(cfg, device, topo, batch)
    finally:
        dist.destroy_process_group()
    rel = abs(loss - local_loss) / abs(local_loss)
    row = (f"| {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} | "
           f"{'nccl' if device.type == 'cuda' else 'gloo'} | {args.fp8} | {loss:.6f} | {local_loss:.6f} | {rel:.1e} | "
           f"{a2a.calls} | {','.join(sorted(a2a.devices))} | {seconds * 1e3:.1f} |")
    print(HEADER + "\n" + row, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\nAll-to-all dispatcher on a world of one, one training step\n\n" + HEADER + "\n" + row + "\n")
    tol = 2e-2 if device.type == "cuda" else 1e-5
    ok = a2a.calls > 0 and a2a.devices == {device.type} and rel <= tol
    if not ok:
        print(f"FAILED: {a2a.calls} all-to-alls on {a2a.devices}, relative loss difference {rel:.1e} (limit {tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
