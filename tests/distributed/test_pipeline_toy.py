"""Pipeline runtime on real gloo ranks with a toy MLP: losses and grads equal one process's."""
import torch
from torch import nn

from parallel.pipeline.runtime import ModuleChunk, PipelineRuntime, reduce_shared_grads
from parallel.pipeline.schedules import build_schedule
from parallel.pipeline.split import DeferrableLinear, WeightGradDeferral
from tests.distributed.spawn import run_ranks

D, BATCH, LAYERS_PER_STAGE = 8, 3, 2


class ToyStage(nn.Module):
    def __init__(self, layer_ids, deferral=None):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): DeferrableLinear(D, D, deferral) for i in layer_ids})
        for i, lin in self.layers.items():  # same init for a layer wherever it lives
            g = torch.Generator().manual_seed(100 + int(i))
            lin.weight.data = torch.randn(D, D, generator=g) / D ** 0.5

    def forward(self, x):
        for lin in self.layers.values():
            x = torch.tanh(lin(x))
        return x


def data(n):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(BATCH, D, generator=g) for _ in range(n)], [torch.randn(BATCH, D, generator=g) for _ in range(n)]


def loss_fn(targets):
    return lambda m, y: ((y - targets[m]) ** 2).mean()


def reference(num_stages, n):
    model = ToyStage(range(num_stages * LAYERS_PER_STAGE))
    xs, ts = data(n)
    losses = [loss_fn(ts)(m, model(xs[m])) for m in range(n)]
    (sum(losses) / n).backward()
    return [l.item() for l in losses], {f"layers.{k}": p.grad for k, p in model.layers.named_parameters()}


def _pipeline_rank(rank, world, pp, n, names):
    out = {}
    for name in names:
        s = build_schedule(name, pp, n)
        place, S = s.placement, s.placement.num_stages
        xs, ts = data(n)
        chunks = []
        for c in range(place.chunks_per_rank):
            st = place.stage_of(rank, c)
            deferral = WeightGradDeferral()
            mod = ToyStage(range(st * LAYERS_PER_STAGE, (st + 1) * LAYERS_PER_STAGE), deferral)
            chunks.append(ModuleChunk(mod, inputs=xs if st == 0 else None,
                                      loss_fn=loss_fn(ts) if st == S - 1 else None, deferral=deferral))
        # one runtime, two steps: the second sends bare tensors (shapes cached), except with
        # dynamic_shapes where every message carries its header again
        rt = PipelineRuntime(s, rank, chunks, dynamic_shapes=name == "zb1p")
        steps = []
        for _ in range(2):
            for ch in chunks:
                ch.module.zero_grad(set_to_none=True)
            losses = rt.run()
            reduce_shared_grads(chunks, rank, pp)
            # numpy: tensors cannot cross the result queue once the rank has exited
            grads = {n_: p.grad.detach().numpy().copy() for ch in chunks for n_, p in ch.named_parameters()}
            steps.append(({m: l.item() for m, (l, _) in zip(_loss_micros(s, rank), losses)}, grads))
        assert steps[1][0] == steps[0][0], (name, "second step losses differ")
        assert all((steps[1][1][k] == v).all() for k, v in steps[0][1].items()), (name, "second step grads")
        out[name] = steps[1]
    return out


def _loss_micros(s, rank):
    return sorted(m for m in range(s.num_micro) if s.placement.routes[m][-1][0] == rank)


def _check(results, pp, n, names):
    for name in names:
        stages = build_schedule(name, pp, n).placement.num_stages
        ref_losses, ref_grads = reference(stages, n)
        losses, grads = {}, {}
        for per_rank in results:
            l, g = per_rank[name]
            losses.update(l)
            for k, v in g.items():
                v = torch.from_numpy(v)
                if k in grads:  # a second copy (DualPipe) must carry the same summed grad
                    torch.testing.assert_close(grads[k], v)
                grads[k] = v
        assert sorted(losses) == list(range(n)), name
        for m in range(n):
            assert abs(losses[m] - ref_losses[m]) < 1e-6, (name, m)
        assert set(grads) == set(ref_grads), name
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


NAMES = ["1f1b", "zb1p", "dualpipe", "dualpipev"]


def test_toy_pipeline_pp2_all_schedules():
    _check(run_ranks(_pipeline_rank, 2, 2, 6, NAMES, timeout=60), 2, 6, NAMES)


def test_toy_pipeline_pp4_all_schedules():
    _check(run_ranks(_pipeline_rank, 4, 4, 8, NAMES, timeout=60), 4, 8, NAMES)
