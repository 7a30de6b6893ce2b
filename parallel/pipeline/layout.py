"""Which blocks each pipeline stage holds: even splits, user layouts, balanced proposals.

A pipeline cuts the model's blocks into contiguous stages, embedding side first; the first
stage also holds the embedding, the last one the final norm, the output head and the MTP
modules. DeepSeek-V3 (arXiv 2412.19437, section 3.2.1) runs 61 blocks plus embedding, head and
MTP on 16 pipeline ranks, so the stages cannot all hold the same number of blocks: which one
gets fewer blocks is a choice (`parallel.layout`), made here from per-block costs when the
planner proposes one.

A layout is a list of block-index lists, one per stage: `[[0, 1], [2, 3, 4], [5]]`. The config
also accepts block counts per stage (`[2, 3, 1]`). The stages of a schedule: pp for 1F1B, ZB1P
and DualPipe (each of DualPipe's two copies is cut the same way), 2 x pp for DualPipeV.
"""
from __future__ import annotations


def num_stages(schedule: str, pp: int) -> int:
    """Stages of one model copy under `schedule` at `pp` pipeline ranks."""
    if pp == 1:
        return 1
    return 2 * pp if schedule == "dualpipev" else pp


def even_layout(num_layers: int, stages: int) -> list[list[int]]:
    """Contiguous, near-equal parts; the later stages get the extra blocks."""
    if num_layers < stages:
        raise ValueError(f"model.num_layers = {num_layers}: a pipeline of {stages} stages needs "
                         f"at least one block per stage")
    return [list(range(s * num_layers // stages, (s + 1) * num_layers // stages)) for s in range(stages)]


def _spec_error(spec, why: str, num_layers: int, stages: int) -> ValueError:
    counts = [len(b) for b in even_layout(num_layers, stages)] if num_layers >= stages else None
    fix = f"e.g. {counts} (block counts per stage)" if counts else f"use at most {num_layers} stages"
    return ValueError(f"layout = {spec}: {why}; give {stages} stages covering blocks 0..{num_layers - 1} "
                      f"once each, in order, {fix}")


def _from_counts(spec: list[int], num_layers: int, stages: int) -> list[list[int]]:
    if any(n < 1 for n in spec):
        raise _spec_error(spec, "every stage needs at least one block", num_layers, stages)
    if sum(spec) != num_layers:
        raise _spec_error(spec, f"the counts sum to {sum(spec)}, not model.num_layers = {num_layers}",
                          num_layers, stages)
    out, start = [], 0
    for n in spec:
        out.append(list(range(start, start + n)))
        start += n
    return out


def _check_blocks(spec: list[list[int]], num_layers: int, stages: int) -> list[list[int]]:
    flat = [i for blocks in spec for i in blocks]
    if any(not blocks for blocks in spec):
        raise _spec_error(spec, "every stage needs at least one block", num_layers, stages)
    seen = set()
    for i in flat:
        if not 0 <= i < num_layers:
            raise _spec_error(spec, f"block {i} does not exist (model.num_layers = {num_layers})", num_layers, stages)
        if i in seen:
            raise _spec_error(spec, f"block {i} is listed twice", num_layers, stages)
        seen.add(i)
    missing = sorted(set(range(num_layers)) - seen)
    if missing:
        raise _spec_error(spec, f"blocks {missing} are in no stage", num_layers, stages)
    if flat != list(range(num_layers)):
        raise _spec_error(spec, "blocks must run in order, each stage continuing where the previous ended",
                          num_layers, stages)
    return [list(b) for b in spec]


def resolve_layout(spec: list, num_layers: int, stages: int) -> list[list[int]]:
    """The stage -> blocks lists of `spec` ([] = even split); ValueError naming the value and a fix."""
    if not spec:
        return even_layout(num_layers, stages)
    if len(spec) != stages:
        raise _spec_error(spec, f"{len(spec)} stages, but the pipeline has {stages}", num_layers, stages)
    if all(isinstance(n, int) and not isinstance(n, bool) for n in spec):
        return _from_counts(spec, num_layers, stages)
    if all(isinstance(b, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in b) for b in spec):
        return _check_blocks(spec, num_layers, stages)
    raise _spec_error(spec, "expected a list of block counts or a list of block-index lists", num_layers, stages)


def balanced_layout(block_costs: list[float], stages: int, first_extra: float = 0.0,
                    last_extra: float = 0.0) -> list[list[int]]:
    """Contiguous split minimising the most expensive stage (exact, by dynamic programming).

    `first_extra` / `last_extra` are the costs of what rides on the first / last stage besides
    its blocks (embedding; final norm, output head and MTP), in the same units as block_costs.
    Every stage gets at least one block. Ties go to the split with later cuts.
    """
    n = len(block_costs)
    if n < stages:
        raise ValueError(f"model.num_layers = {n}: a pipeline of {stages} stages needs at least one block per stage")
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, lo: int, hi: int) -> float:
        extra = (first_extra if s == 0 else 0.0) + (last_extra if s == stages - 1 else 0.0)
        return prefix[hi] - prefix[lo] + extra

    inf = float("inf")
    # best[s][i] = the smallest max stage cost of blocks [0, i) over stages [0, s]
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, 0, i)
    for s in range(1, stages):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                v = max(best[s - 1][j], cost(s, j, i))
                if v <= best[s][i]:
                    best[s][i], cut[s][i] = v, j
    bounds, i = [n], n
    for s in range(stages - 1, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    bounds.append(0)
    bounds.reverse()
    return [list(range(bounds[s], bounds[s + 1])) for s in range(stages)]


def _span(blocks: list[int]) -> str:
    return f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {blocks[0]}-{blocks[-1]}"


def describe_layout(layout: list[list[int]], ranks_of_stage: list[list[int]], mtp_depth: int = 0) -> str:
    """One line per stage: `stage 3 (rank 3): blocks 9-11 + head, MTP`."""
    last = len(layout) - 1
    lines = []
    for s, blocks in enumerate(layout):
        parts = (["embedding"] if s == 0 else []) + [_span(blocks)]
        if s == last:
            parts.append("norm, head" + (", MTP" if mtp_depth else ""))
        ranks = ", ".join(map(str, ranks_of_stage[s]))
        lines.append(f"stage {s} (rank {ranks}): " + " + ".join(parts))
    return "\n".join(lines)
