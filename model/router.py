"""DeepSeekMoE routing as small pure functions (DeepSeek-V3 sections 2.1.2-2.1.3, 3.2.2).

1. Affinities s = sigmoid(u W_gate^T) (DeepSeek-V3) or softmax (DeepSeek-V2), in fp32.
2. Selection: top-K of (s + b), b the per-expert balancing bias, after group limiting: experts
   sit in n_group groups (= nodes under expert parallelism); only the topk_group best groups are
   eligible ("node-limited"). A group's score is the sum of its top-2 biased affinities in
   DeepSeek-V3 (`top2_sum`), its highest affinity in DeepSeek-V2's device-limited routing
   (DeepSeek-V2 section 2.2.2, `max`); DeepSeek's released gates score groups the same ways.
3. Gate weights: the *unbiased* s of the chosen experts, normalised to sum 1 (eq. 13), times
   routed_scaling_factor. The bias changes selection only, never the weights.
4. Auxiliary-loss-free balancing: after each step b_i += gamma * sign(mean load - load_i).
5. Sequence-wise balance loss (eq. 17-20): f_i = N_r/(K_r T) * #{t: i in topk(t)},
   P_i = mean_t s'_{i,t} with s' = s / sum_j s_j, L_bal = alpha * sum_i f_i P_i, per sequence.

Legend: T tokens, E routed experts, K experts per token, G groups, B rows, L row length.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def affinities(logits_TE: Tensor, score_func: str) -> Tensor:
    logits = logits_TE.float()
    if score_func == "sigmoid":
        return logits.sigmoid()
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    raise ValueError(f"moe.score_func = {score_func!r}: must be 'sigmoid' or 'softmax'")


def group_scores(grouped_TGe: Tensor, how: str) -> Tensor:
    """Score [T,G] of each group from its (biased) affinities [T,G,E/G]: `max` or `top2_sum`."""
    if how == "max":
        return grouped_TGe.amax(dim=-1)
    assert how == "top2_sum", how
    return grouped_TGe.topk(min(2, grouped_TGe.shape[-1]), dim=-1).values.sum(-1)


def group_limited_topk(scores_TE: Tensor, bias_E: Tensor, topk: int, n_group: int, topk_group: int,
                       group_score: str = "top2_sum") -> Tensor:
    """Indices [T,K] of the chosen experts: top-K of s + b among the topk_group best groups."""
    T, E = scores_TE.shape
    biased = scores_TE.detach() + bias_E.to(scores_TE.dtype)
    if n_group > 1 and topk_group < n_group:
        grouped_TGe = biased.view(T, n_group, E // n_group)
        group_score_TG = group_scores(grouped_TGe, group_score)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_score_TG.topk(topk_group, dim=-1).indices, True)
        keep_TE = keep_TG[:, :, None].expand_as(grouped_TGe).reshape(T, E)
        biased = biased.masked_fill(~keep_TE, float("-inf"))
    return biased.topk(topk, dim=-1).indices


def gate_weights(scores_TE: Tensor, ids_TK: Tensor, normalize: bool, scaling: float) -> Tensor:
    """Weights [T,K] from the unbiased affinities of the chosen experts (gradients flow to s)."""
    w = scores_TE.gather(1, ids_TK)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling


def expert_counts(ids_TK: Tensor, num_experts: int, valid_T: Tensor | None = None) -> Tensor:
    """Tokens routed to each expert [E] (fp32), counting only valid tokens.

    A scatter-add of 0/1 weights rather than indexing out the padding and a bincount: the shape
    never depends on the data, so there is no host sync on a GPU and no graph break under compile.
    """
    ones_TK = torch.ones_like(ids_TK, dtype=torch.float32)
    if valid_T is not None:
        ones_TK = ones_TK * valid_T[:, None]
    return ones_TK.new_zeros(num_experts).scatter_add_(0, ids_TK.reshape(-1), ones_TK.reshape(-1))


def seq_balance_loss(scores_BLE: Tensor, ids_BLK: Tensor, valid_BL: Tensor, alpha: float) -> Tensor:
    """Sequence-wise balance loss, eq. 17-20, averaged over rows; padding tokens excluded."""
    B, L, E = scores_BLE.shape
    K = ids_BLK.shape[-1]
    valid = valid_BL.float()
    T_B = valid.sum(1).clamp(min=1)                                   # tokens per row
    chosen = torch.zeros(B, L, E, device=scores_BLE.device).scatter_(2, ids_BLK, 1.0)
    f_BE = (chosen * valid[..., None]).sum(1) * (E / (K * T_B[:, None]))
    s_norm = scores_BLE / scores_BLE.sum(-1, keepdim=True)
    P_BE = (s_norm * valid[..., None]).sum(1) / T_B[:, None]
    return alpha * (f_BE * P_BE).sum(-1).mean()


@torch.no_grad()
def update_bias(bias_E: Tensor, counts_E: Tensor, gamma: float) -> None:
    """In place: b_i += gamma * sign(mean(counts) - counts_i) (overloaded experts go down)."""
    counts = counts_E.to(bias_E.device, torch.float32)
    bias_E.add_(gamma * torch.sign(counts.mean() - counts).to(bias_E.dtype))


class Router(nn.Module):
    """Gate Linear + balancing bias buffer (persistent: it is checkpointed with the model; it
    stays fp32 when the model is cast to a lower precision)."""

    def __init__(self, provider, hidden: int, moe, *, layer: int):
        super().__init__()
        self.moe = moe
        self.gate = provider.linear(hidden, moe.num_experts, kind="router", layer=layer)
        self.register_buffer("bias", torch.zeros(moe.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # keep the bias in fp32 under model.to(bf16): +-gamma steps would vanish in bf16 rounding
        super()._apply(fn, recurse)
        if self.bias.is_floating_point() and self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        return self

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (ids [T,K], weights [T,K] fp32, affinities [T,E] fp32)."""
        m = self.moe
        scores = affinities(self.gate(x_TD), m.score_func)
        ids = group_limited_topk(scores, self.bias, m.topk, m.n_group, m.topk_group, m.group_scoring)
        return ids, gate_weights(scores, ids, m.normalize_weights, m.routed_scaling_factor), scores
