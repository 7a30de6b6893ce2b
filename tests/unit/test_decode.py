"""Decoding from MLA's latent cache equals re-running the whole prefix, step by step."""
import pytest
import torch

from model.decode import LatentDecoder, full_logits
from model.transformer import build_model
from trainer.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(*sets):
    cfg = load_config(None, ["model.hidden_size=64", "model.max_seq_len=32", "data.seq_len=32",
                             "model.vocab_size=128", "model.num_layers=3", *sets])
    return build_model(cfg).eval()


@pytest.mark.parametrize("q_lora", [64, 0])
def test_latent_cache_logits_equal_full_recomputation_at_every_step(q_lora):
    torch.manual_seed(0)
    model = _model(f"attention.q_lora_rank={q_lora}", "model.init_std=0.05")
    tokens = torch.randint(0, 128, (2, 20))
    dec = LatentDecoder(model, batch=2)
    prompt = 7
    got = [dec.forward(tokens[:, :prompt])]                       # prompt in one go (causal inside)
    for t in range(prompt, tokens.shape[1]):                      # then one token per step
        got.append(dec.forward(tokens[:, t:t + 1]))
    got = torch.cat(got, dim=1)
    for t in range(prompt - 1, tokens.shape[1]):
        ref = full_logits(model, tokens[:, :t + 1])[:, -1]
        torch.testing.assert_close(got[:, t], ref, rtol=1e-4, atol=1e-4)
    assert dec.cache.length == tokens.shape[1]


def test_cache_bytes_per_token_is_latent_plus_rope_key_per_layer():
    model = _model()
    att = model.cfg.attention
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        dec = LatentDecoder(model, dtype=dtype)
        assert dec.cache.bytes_per_token == (att.kv_lora_rank + att.qk_rope_head_dim) * 3 * size


def test_decoding_past_the_cache_length_is_refused():
    dec = LatentDecoder(_model())
    with pytest.raises(ValueError, match="max_seq_len"):
        dec.forward(torch.zeros(1, 33, dtype=torch.long))


def test_generation_benchmark_runs_both_paths_on_a_short_context(capsys):
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(root, "benchmarks", "bench_generate.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    med = bench.main(["--config", os.path.join(root, "configs", "tiny.yaml"), "--context", "8", "--new", "3",
                      "--repeats", "1"])
    assert med["latent cache"] > 0 and med["recompute prefix"] > 0
    assert "greedy tokens equal in 3/3 steps" in capsys.readouterr().out
