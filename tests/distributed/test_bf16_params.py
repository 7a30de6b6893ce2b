"""`train.param_dtype = bf16`: bf16 weights and gradients, fp32 masters and moments only in the
optimizer (ZeRO-1 shards at dp > 1, the local AdamW's masters in one process), built by the
trainer's own `build_engine` on real gloo ranks.

- dtypes: parameters and gradients bf16, masters, moments and reduced gradient shards fp32;
- dp 2 equals one process to 2e-3 relative on the loss over 3 steps: both compute in bf16, but
  one process's autograd accumulates the whole batch's bf16 gradient where each dp rank holds
  half of it (summed in fp32 by the reduce-scatter), and a master that differs by fp32 rounding
  can round to a neighbouring bf16 weight (one bf16 ulp is 2^-8 relative);
- the all-gather left in flight until the next forward gives exactly the weights and losses of
  the synchronous gather, and a checkpoint taken while it is in flight holds the new weights;
- `optim.grad_reduce_dtype = bf16` trains within 1e-2 relative of the fp32 reduce-scatter;
- resume: the same layout continues bit for bit after a save and load into a fresh engine; a
  bf16 checkpoint of dp 4 loads exactly at dp 4 x ep 2, at pp 2 x dp 2 and into an fp32 run
  (whose parameters are then the fp32 masters, not the bf16 weights).
"""
import pytest
import torch

from model.batch import make_batch
from parallel import checkpoint as ckpt
from parallel.engine import build_engine
from parallel.expert import expert_shards
from parallel.topology import Topology, plan_layout
from tests.distributed.spawn import run_ranks
from trainer.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["model.vocab_size=256", "model.max_seq_len=16", "data.seq_len=16", "model.num_layers=2",
         "model.hidden_size=32", "model.dense_ffn_size=32", "moe.expert_ffn_size=16", "attention.num_heads=2",
         "train.micro_batch_size=1", "optim.lr=1e-2"]
CPU = torch.device("cpu")


def _cfg(*extra):
    return load_config(None, SMALL + list(extra))


def _engine(cfg, topology=None):
    topology = topology or Topology.from_config(cfg.parallel)
    return build_engine(cfg, topology, CPU, torch.bfloat16 if cfg.train.param_dtype == "bf16" else None)


def _tokens(step: int, rows: int) -> torch.Tensor:
    return torch.randint(0, 256, (rows, 16), generator=torch.Generator().manual_seed(step))


def _step(engine, step: int, rank: int, dp: int) -> float:
    """One optimizer step on this rank's rows of the step's 2-row batch; the step's loss."""
    rows = _tokens(step, 2)[rank * 2 // dp:(rank + 1) * 2 // dp]
    m = engine.reduce_metrics(engine.forward_backward([make_batch(rows, None)]))
    engine.reduce_and_norm()
    engine.apply(1e-2)
    return m.loss


def _params(engine) -> dict:
    if hasattr(engine, "zero"):
        engine.zero.wait_params()
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def _dp2_case(rank, world, root):
    bf16 = _cfg("train.param_dtype=bf16")
    local = _engine(bf16, Topology(plan_layout(1), 0))
    deferred, sync = _engine(bf16), _engine(bf16)
    sync.zero.deferred = False
    bf16_reduce = _engine(_cfg("train.param_dtype=bf16", "optim.grad_reduce_dtype=bf16"))
    assert {p.dtype for p in deferred.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in local.model.parameters()} == {torch.bfloat16}
    assert {s["master"].dtype for s in local.optimizer.state.values()} == {torch.float32}
    losses = {k: [] for k in ("local", "deferred", "sync", "bf16_reduce")}
    for step in range(3):
        losses["local"].append(_step(local, step, 0, 1))
        losses["sync"].append(_step(sync, step, rank, world))
        losses["bf16_reduce"].append(_step(bf16_reduce, step, rank, world))
        rows = _tokens(step, 2)[rank:rank + 1]
        m = deferred.reduce_metrics(deferred.forward_backward([make_batch(rows, None)]))
        assert {p.grad.dtype for p in deferred.model.parameters() if p.grad is not None} == {torch.bfloat16}
        deferred.reduce_and_norm()
        z = deferred.zero
        assert {b.grad.dtype for b in z.buckets} == {torch.float32}
        assert {b.master.dtype for b in z.buckets} | {b.exp_avg.dtype for b in z.buckets} == {torch.float32}
        deferred.apply(1e-2)
        assert len(z._pending) == len(z.buckets)  # in flight until the next forward (or a reader) waits
        losses["deferred"].append(m.loss)
    # a checkpoint's view waits for the gather in flight: it is the synchronous engine's state
    for key, v in deferred.state_dict().items():
        if key.startswith("model."):
            torch.testing.assert_close(v, sync.state_dict()[key], rtol=0, atol=0, msg=key)
    assert losses["deferred"] == losses["sync"]
    assert losses["sync"] == pytest.approx(losses["local"], rel=2e-3)
    assert losses["bf16_reduce"] == pytest.approx(losses["sync"], rel=1e-2)
    # same layout: save after step 3, load into a fresh engine, step 4 is bit for bit the same
    path = ckpt.save(root, 3, deferred.state_dict(), {"step": 3}, "x: 1\n", 2, deferred.topology)
    fresh = _engine(_cfg("train.param_dtype=bf16", "train.seed=5"))
    assert ckpt.load(path, fresh) == {"step": 3}
    assert _step(fresh, 3, rank, world) == _step(deferred, 3, rank, world)
    for key, v in _params(fresh).items():
        torch.testing.assert_close(v, _params(deferred)[key], rtol=0, atol=0, msg=key)
    return losses


def test_dp2_bf16_params_match_one_process_and_resume_exactly(tmp_path):
    run_ranks(_dp2_case, 2, str(tmp_path / "ckpt"))


def _snapshot(engine) -> dict:
    """Every model tensor (full rows: expert rows placed at their global offset) and every
    parameter's master and moments, by single-process name."""
    shards = expert_shards(engine.model)
    out = {}
    for k, v in _params(engine).items():
        out[f"model.{k}"] = (shards[k][0] if k in shards else 0, v)
    for name, per in engine.zero.full_state().items():
        for key, v in per.items():
            out[f"optim.{name}.{key}"] = (shards[name][0] if name in shards else 0, v)
    return out


def _assert_holds(saved: dict, got: dict, cast_to=None) -> int:
    for key, (offset, v) in got.items():
        want = saved[key][1][offset:offset + v.shape[0]] if v.dim() else saved[key][1]
        master = "optim." + key[len("model."):] + ".master"
        if key.startswith("model.") and master in saved and cast_to is not None:  # parameters = fp32 masters
            want = saved[master][1][offset:offset + v.shape[0]]
        torch.testing.assert_close(v, want.to(v.dtype), rtol=0, atol=0, msg=key)
    return len(got)


def _layouts_case(rank, world, root):
    source = _engine(_cfg("train.param_dtype=bf16"))
    _step(source, 0, rank % 2, 2)
    path = ckpt.save(root, 1, source.state_dict(), {"step": 1}, "x: 1\n", 2, source.topology)
    saved = _snapshot(source)
    assert saved["model.embed.weight"][1].dtype == torch.bfloat16
    n = {}
    for name, extra in {"ep2": ["parallel.ep=2"], "pp2": ["parallel.pp=2", "train.grad_accum=2"]}.items():
        engine = _engine(_cfg("train.param_dtype=bf16", "train.seed=3", *extra))
        assert ckpt.load(path, engine) == {"step": 1}
        n[name] = _assert_holds(saved, _snapshot(engine))
    fp32 = _engine(_cfg("train.seed=4"))
    ckpt.load(path, fp32)
    got = _snapshot(fp32)
    assert got["model.embed.weight"][1].dtype == torch.float32
    n["fp32"] = _assert_holds(saved, got, cast_to=torch.float32)
    return n


def test_bf16_checkpoint_loads_exactly_at_other_layouts_and_into_fp32(tmp_path):
    counts = run_ranks(_layouts_case, 4, str(tmp_path / "ckpt"))
    assert all(c["ep2"] > 0 and c["pp2"] > 0 and c["fp32"] > 0 for c in counts)


def _deferred_case(rank, world, name, extra):
    """Deferred vs synchronous all-gather on one layout: 2 steps, same losses and weights."""
    cfg = _cfg("train.param_dtype=bf16", *extra)
    deferred, sync = _engine(cfg), _engine(cfg)
    sync.zero.deferred = False
    n = cfg.train.grad_accum
    dp, dp_rank = deferred.topology.dp, deferred.topology.dp_rank
    out = {"deferred": [], "sync": []}
    for step in range(2):
        rows = _tokens(step, dp * n)[dp_rank * n:(dp_rank + 1) * n]
        for key, engine in (("deferred", deferred), ("sync", sync)):
            m = engine.reduce_metrics(engine.forward_backward([make_batch(r[None], None) for r in rows]))
            engine.reduce_and_norm()
            engine.apply(1e-2)
            out[key].append(m.loss)
        assert len(deferred.zero._pending) == len(deferred.zero.buckets)
    assert out["deferred"] == out["sync"], name
    for key, v in _params(deferred).items():
        torch.testing.assert_close(v, _params(sync)[key], rtol=0, atol=0, msg=f"{name} {key}")
    return out["deferred"]


@pytest.mark.parametrize("name, extra", [
    ("dp4 ep2, F&B pairs", ["parallel.ep=2", "train.grad_accum=2"]),
    ("pp2 dp2 ep2 dualpipev", ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipev", "train.grad_accum=4",
                               "model.num_layers=4"]),
    ("pp2 dp2 zb1p", ["parallel.pp=2", "parallel.schedule=zb1p", "train.grad_accum=2"]),
])
def test_deferred_all_gather_equals_the_synchronous_one(name, extra):
    """Every engine path (pairs, pipeline pieces, deferred weight gradients): a module that read
    its weights before their bucket arrived would change the step's loss."""
    losses = run_ranks(_deferred_case, 4, name, extra)
    assert losses[0][0] != losses[0][1]  # the weights moved
