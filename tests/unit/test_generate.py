"""`python -m trainer.generate`: sampling, streaming, cache size line, and one-line errors."""
import dataclasses

import pytest
import torch

from tests.unit.test_error_lines import LINE
from trainer.generate import main, sample_next

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sampling_greedy_and_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 1.0, gen) == 1
    picks = {sample_next(logits, 1.0, 0.5, gen) for _ in range(200)}
    assert picks == {1}                                   # token 1 alone holds > 50% of the mass
    picks = {sample_next(logits, 1.0, 0.9, gen) for _ in range(400)}
    assert picks == {1, 2}


def test_generate_streams_text_and_prints_cache_bytes(tiny_checkpoint, capsys):
    path, cfg = tiny_checkpoint
    args = [path, "--prompt", "In the beginning God", "--max-new-tokens", "12", "--seed", "3"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("In the beginning God") and len(out) > len("In the beginning God\n")
    per_token = (cfg.attention.kv_lora_rank + cfg.attention.qk_rope_head_dim) * cfg.model.num_layers * 4
    assert f"latent cache {per_token} bytes/token" in err and "tokens/s" in err
    assert main(args) == 0
    assert capsys.readouterr().out == out                 # same seed, same text


@pytest.mark.parametrize("prompt, needle", [("   ", "empty; give some text"), ("word " * 400, "max_seq_len = 256")])
def test_bad_prompts_end_with_one_line(tiny_checkpoint, capsys, prompt, needle):
    assert main([tiny_checkpoint[0], "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and LINE.match(err.strip())


def test_tokenizer_larger_than_the_vocabulary_is_refused(tiny_checkpoint, tmp_path, capsys):
    from model.transformer import build_model
    from parallel.checkpoint import write_checkpoint
    from trainer.config import dump_yaml
    _, cfg = tiny_checkpoint
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=1000))
    tensors = {f"model.{k}": v for k, v in build_model(cfg).state_dict().items()}
    path = write_checkpoint(str(tmp_path), 1, {"step": 1}, dump_yaml(cfg), 1, tensors=tensors)
    assert main([path, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "model.vocab_size = 1000" in err and "--tokenizer" in err and LINE.match(err.strip())
