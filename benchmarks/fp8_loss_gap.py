"""BF16 vs FP8 training-loss comparison (DeepSeek-V3 report section 3.3 and appendix B.1).

`python benchmarks/fp8_loss_gap.py [--steps 200] [--set fp8.backend=emulate ...]` prints one table.

DeepSeek-V3 validated its FP8 recipe by training the same model in BF16 and in FP8 and reporting
the relative loss error (below 0.25% at 16B and 230B). `fp8_vs_bf16_loss_gap` does the same at
toy scale: two models from one seed (identical initial weights: the FP8 provider keeps the
parameter names and init), the same synthetic batches, AdamW, and the relative gap of the mean
loss over the last steps. The data is a noisy random permutation chain (token t+1 = perm[t] with
probability `p_follow`, else uniform), so there is something to learn and the loss falls well
below log(vocab) within a few hundred steps.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from parallel.fp8.provider import make_provider


def synthetic_batches(vocab: int, batch: int, seq_len: int, steps: int, *, p_follow: float = 0.8,
                      seed: int = 0):
    """`steps` token tensors [batch, seq_len] from a noisy permutation chain (one document per row)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    for _ in range(steps):
        tok = torch.empty(batch, seq_len, dtype=torch.long)
        tok[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for i in range(1, seq_len):
            follow = torch.rand(batch, generator=g) < p_follow
            rand = torch.randint(0, vocab, (batch,), generator=g)
            tok[:, i] = torch.where(follow, perm[tok[:, i - 1]], rand)
        yield tok


def train_losses(cfg, steps: int, batch: int, seq_len: int, seed: int = 0) -> list[float]:
    """Per-step training loss of `cfg`'s model (BF16 or FP8 per cfg.fp8) on the synthetic stream."""
    from model.batch import make_batch
    from model.transformer import build_model
    from parallel.adamw import build_optimizer

    model = build_model(cfg, provider=make_provider(cfg.fp8, cfg.model.num_layers))
    opt = build_optimizer(model, cfg.optim)
    losses = []
    for tokens in synthetic_batches(cfg.model.vocab_size, batch, seq_len, steps, seed=seed):
        b = make_batch(tokens, [np.array([seq_len], dtype=np.int32)] * batch)
        out = model(b)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if hasattr(model, "update_router_bias"):
            model.update_router_bias(out.expert_counts)
        losses.append(float(out.lm_loss))
    return losses


def fp8_vs_bf16_loss_gap(config_path: str = "configs/tiny.yaml", overrides: list[str] | None = None,
                         steps: int = 200, batch: int = 8, seq_len: int = 128, tail: int = 20) -> dict:
    """Train BF16 and FP8 (emulate unless overridden) copies; relative gap of the mean tail loss."""
    from trainer.config import load_config

    overrides = list(overrides or [])
    result = {}
    for mode, fp8 in (("bf16", ["fp8.enabled=false"]), ("fp8", ["fp8.enabled=true"])):
        cfg = load_config(config_path, overrides + fp8)
        result[mode] = train_losses(cfg, steps, batch, seq_len)
    tail = min(tail, steps)
    ref, got = (float(np.mean(result[m][-tail:])) for m in ("bf16", "fp8"))
    result["bf16_tail"], result["fp8_tail"] = ref, got
    result["rel_gap"] = abs(got - ref) / ref
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="BF16 vs FP8 loss gap on the tiny model")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args()
    r = fp8_vs_bf16_loss_gap(args.config, args.set, steps=args.steps)
    print("| run | mean lm loss, last 20 steps |\n|---|---|")
    print(f"| BF16 | {r['bf16_tail']:.4f} |\n| FP8 | {r['fp8_tail']:.4f} |")
    print(f"relative gap: {100 * r['rel_gap']:.2f}%")


if __name__ == "__main__":
    main()
