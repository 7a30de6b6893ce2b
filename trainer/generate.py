"""Sample text from a checkpoint: `python -m trainer.generate CKPT --prompt TEXT [options]`.

Decodes with MLA's latent cache (`model.decode`: c_KV and the shared RoPE key per token, the
up-projections absorbed, DeepSeek-V2 section 2.1.3): the prompt runs once, then one token per
step. Tokens come from the run's prepared tokenizer; text is streamed to stdout as it forms
(a token that ends inside a multi-byte character waits for the next one). Sampling: temperature
(0 = greedy) then nucleus top-p (Holtzman et al. 2019), from a seeded generator, so a command
repeats its output. Generation stops at the end-of-document token, after --max-new-tokens, or at
model.max_seq_len. On stderr: tokens/s of the decode steps and the cache bytes per token,
(kv_lora_rank + qk_rope_head_dim) x layers x dtype size.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from trainer.cli import user_errors


def sample_next(logits_V: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token id from logits: greedy at temperature 0, else softmax(logits / T) cut to top-p mass."""
    if temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p          # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class TextStream:
    """Prints the decoded text of a growing id list, holding back an incomplete character."""

    def __init__(self, tok, out):
        self.tok, self.out, self.ids, self.shown = tok, out, [], 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.hf.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)


def encode_prompt(tok, prompt: str, max_seq_len: int) -> list[int]:
    if not prompt.strip():
        raise ValueError(f"--prompt = {prompt!r}: empty; give some text to continue, e.g. --prompt 'In the beginning'")
    ids = tok.encode([prompt])[0]
    if len(ids) >= max_seq_len:
        raise ValueError(f"--prompt = {len(ids)} tokens: no room to generate within model.max_seq_len = "
                         f"{max_seq_len}; shorten it to under {max_seq_len} tokens")
    return ids


@torch.no_grad()
def generate(model, tok, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int,
             out=None) -> dict:
    """Stream a continuation of `ids` to `out` (stdout); returns the new ids and timings."""
    out = out or sys.stdout
    from model.decode import LatentDecoder
    decoder = LatentDecoder(model)
    gen = torch.Generator().manual_seed(seed)
    budget = min(max_new_tokens, model.cfg.model.max_seq_len - len(ids))
    stream, new = TextStream(tok, out), []
    t0 = time.perf_counter()
    logits = decoder.forward(torch.tensor([ids]))[0, -1]
    t_prompt = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(budget):
        logits[tok.vocab_size:] = float("-inf")          # head rows past the tokenizer never trained
        token = sample_next(logits, temperature, top_p, gen)
        if token == tok.eos_id:
            break
        new.append(token)
        stream.add(token)
        if i + 1 < budget:
            logits = decoder.forward(torch.tensor([[token]]))[0, -1]
    seconds = time.perf_counter() - t1
    out.write("\n")
    return {"ids": new, "prompt_seconds": t_prompt, "decode_seconds": seconds,
            "tokens_per_s": len(new) / seconds if seconds > 0 else 0.0,
            "cache_bytes_per_token": decoder.cache.bytes_per_token, "truncated": budget < max_new_tokens}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX/) or DCP directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help="config YAML (default: config.yaml of the checkpoint)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's prepared one)")
    return p.parse_args(argv)


@user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from trainer.restore import load_model, load_run_tokenizer
    if not 0 < args.top_p <= 1 or args.temperature < 0 or args.max_new_tokens < 1:
        raise ValueError(f"--top-p / --temperature / --max-new-tokens = {args.top_p} / {args.temperature} / "
                         f"{args.max_new_tokens}: out of range; use 0 < top-p <= 1, temperature >= 0, "
                         "max-new-tokens >= 1")
    cfg, model = load_model(args.checkpoint, args.config)
    tok = load_run_tokenizer(cfg, args.tokenizer)
    ids = encode_prompt(tok, args.prompt, cfg.model.max_seq_len)
    sys.stdout.write(args.prompt)
    r = generate(model, tok, ids, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    note = " (stopped at model.max_seq_len)" if r["truncated"] and len(r["ids"]) else ""
    print(f"{len(r['ids'])} tokens in {r['decode_seconds']:.2f} s: {r['tokens_per_s']:.1f} tokens/s{note}; "
          f"prompt {len(ids)} tokens in {r['prompt_seconds']:.2f} s; latent cache "
          f"{r['cache_bytes_per_token']} bytes/token", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
