"""The DeepSeek-V3 model: embedding -> blocks -> RMSNorm -> output head, plus MTP modules.

The model may be built with fewer blocks (`layers`) and with or without the embedding and the
head: the blocks a pipeline rank holds. `model.stage(layers, embed, head)` hands out one stage
of it (`ModelStage`): the blocks it runs, in order, with the embedding, the head and the MTP
modules where the stage holds them, as modules shared with the model under the model's own
parameter names (blocks are `layers.<global index>`), so that checkpoints, ZeRO and the
router-bias update see one model. A stage with the head also uses the embedding when MTP (or
tied embeddings) needs it: under pipeline parallelism that copy's gradient is summed with the
first stage's, as for tied embeddings in Megatron. Losses: lm + mtp.loss_weight * mean MTP loss
+ the sequence-wise balance losses (DeepSeek-V3 sections 2.1-2.2). A batch that carries its
step's counts (`Batch.step_counts`) yields its share of the step's loss: token losses summed and
divided by the step's target count per head, balance losses (means over rows) weighted by its
share of the step's rows; the shares of a step's micro-batches and ranks sum to its loss.

MoE layers of the full model (main MoE blocks in order, then the MoE blocks of the MTP modules)
each own one row of `expert_counts` [n_moe_layers, E]; a stage leaves the rows it does not own
at zero, so summing counts over all ranks gives the global loads for `update_router_bias`.

Legend: B batch, L sequence, D hidden, V vocab, E routed experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.batch import mtp_labels
from model.block import Block
from model.context import Context, make_context
from model.init import init_weights
from model.layers import RMSNorm, rope_tables
from model.loss import token_cross_entropy
from model.experts import LocalDispatcher
from model.moe import MoE
from model.mtp import MTPModule, shift_tokens
from model.provider import LayerProvider
from model.router import update_bias


@dataclass
class ModelOutput:
    loss: Tensor            # lm + mtp_weight * mtp + balance (carries the graph)
    lm_loss: Tensor         # detached
    mtp_loss: Tensor        # detached, mean over depths (0 without MTP)
    balance_loss: Tensor    # detached, sum over MoE layers
    expert_counts: Tensor   # [n_moe_layers, E] fp32, detached


def moe_layer_names(cfg) -> list[str]:
    """Names of all MoE blocks of the full model in expert-count row order."""
    m = cfg.model
    if m.first_k_dense >= m.num_layers:
        return []
    return [f"layers.{i}" for i in range(m.first_k_dense, m.num_layers)] + \
        [f"mtp.{k}.block" for k in range(cfg.mtp.depth)]


def needs_embedding(cfg, embed: bool, head: bool) -> bool:
    """Whether a stage uses the embedding: it embeds tokens, or its MTP / tied head reads it."""
    return embed or (head and (cfg.mtp.depth > 0 or cfg.model.tie_embeddings))


class StageForward(nn.Module):
    """What a stage runs: embedding (if held), its blocks `owned` in order, then the final norm,
    head, MTP modules and losses (if it holds the head). Subclasses provide the modules
    (`embed`, `layers`, `norm`, `head`, `mtp`), `cfg`, `owned`, `has_embed`, `has_head` and
    `make_context`."""

    def blocks(self) -> list[Block]:
        """This stage's blocks in forward order."""
        return [self.layers[str(i)] for i in self.owned]

    def embed_tokens(self, batch) -> Tensor:
        if not self.has_embed:
            raise RuntimeError("embed_tokens called on a stage built with embed=False")
        return self.embed(batch.tokens)

    def forward(self, batch, h: Tensor | None = None, ctx: Context | None = None):
        """Full model: ModelOutput. A stage without head returns h; without embed it needs h."""
        ctx = self.make_context(batch) if ctx is None else ctx
        if h is None:
            h = self.embed_tokens(batch)
        for block in self.blocks():
            h = block(h, ctx)
        return self.head_loss(h, batch, ctx) if self.has_head else h

    def head_loss(self, h_BLD: Tensor, batch, ctx: Context | None = None) -> ModelOutput:
        """Final norm, head, MTP and all losses; adds the balance losses recorded in ctx."""
        if not self.has_head:
            raise RuntimeError("head_loss called on a stage built with head=False")
        ctx = self.make_context(batch) if ctx is None else ctx
        # the logits are temporaries read only by the loss: their storage takes their gradient
        counts = batch.step_counts  # [rows, lm targets, MTP targets per depth] of the step, or None
        lm = token_cross_entropy(self.head(self.norm(h_BLD)), batch.labels, overwrite_logits=True,
                                 denominator=None if counts is None else counts[1])
        mtp_losses, h_prev = [], h_BLD
        for k, module in enumerate(self.mtp, start=1):
            h_prev = module(h_prev, self.embed(shift_tokens(batch.tokens, k)), ctx)
            mtp_losses.append(token_cross_entropy(self.head(module.norm(h_prev)), mtp_labels(batch, k),
                                                  overwrite_logits=True,
                                                  denominator=None if counts is None else counts[1 + k]))
        mtp = torch.stack(mtp_losses).mean() if mtp_losses else lm.new_zeros(())
        balance = ctx.balance_loss()
        loss = lm + self.mtp_loss_weight * mtp + balance
        return ModelOutput(loss=loss, lm_loss=lm.detach(), mtp_loss=mtp.detach(),
                           balance_loss=balance.detach(), expert_counts=ctx.expert_counts.detach())

    def moe_modules(self) -> list[MoE]:
        return [mod for mod in self.modules() if isinstance(mod, MoE)]


class DeepSeekV3(StageForward):
    def __init__(self, cfg, provider, dispatcher, layers=None, embed: bool = True, head: bool = True):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        # scheduled during training (set_loss_weights, update_router_bias); the config gives the start
        self.mtp_loss_weight = cfg.mtp.loss_weight
        self.owned = sorted(range(m.num_layers) if layers is None else {int(i) for i in layers})
        if self.owned and not (0 <= self.owned[0] and self.owned[-1] < m.num_layers):
            raise ValueError(f"layers {self.owned}: indices must be in [0, model.num_layers = {m.num_layers})")
        self.has_embed, self.has_head = embed, head
        self.moe_names = moe_layer_names(cfg)
        slot = {name: i for i, name in enumerate(self.moe_names)}
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size) if needs_embedding(cfg, embed, head) else None
        self.layers = nn.ModuleDict({
            str(i): Block(cfg, provider, dispatcher, layer=i, moe_index=slot.get(f"layers.{i}"))
            for i in self.owned})
        if head:
            self.norm = RMSNorm(m.hidden_size, m.norm_eps)
            self.head = provider.linear(m.hidden_size, m.vocab_size, kind="output_head", layer=None)
            if m.tie_embeddings:
                self.head.weight = self.embed.weight
            self.mtp = nn.ModuleList([
                MTPModule(cfg, provider, dispatcher, layer=m.num_layers + k, moe_index=slot.get(f"mtp.{k}.block"))
                for k in range(cfg.mtp.depth)])
        cos, sin = rope_tables(cfg.attention.qk_rope_head_dim, m.max_seq_len, cfg.attention.rope_theta, yarn=cfg.attention.yarn)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_names)

    def make_context(self, batch) -> Context:
        return make_context(batch, self.rope_cos, self.rope_sin, self.n_moe_layers, self.cfg.moe.num_experts)

    def stage(self, layers, embed: bool, head: bool) -> "ModelStage":
        """One pipeline stage of this model: blocks `layers`, the embedding if `embed`, the
        head and MTP modules if `head`; its parameters are this model's, under the same names."""
        return ModelStage(self, layers, embed, head)

    def set_loss_weights(self, mtp_loss_weight: float, seq_aux_loss_alpha: float) -> None:
        """The MTP weight lambda and the sequence-wise balance weight alpha of the next forwards
        (a schedule may change them during training; DeepSeek-V3 section 4.2)."""
        self.mtp_loss_weight = mtp_loss_weight
        for mod in self.moe_modules():
            mod.seq_aux_loss_alpha = seq_aux_loss_alpha

    @torch.no_grad()
    def update_router_bias(self, counts: Tensor, gamma: float | None = None) -> None:
        """Aux-loss-free balancing step from counts [n_moe_layers, E] summed over all ranks, at
        bias update speed `gamma` (default moe.bias_update_speed)."""
        expected = (self.n_moe_layers, self.cfg.moe.num_experts)
        if tuple(counts.shape) != expected:
            raise ValueError(f"update_router_bias: counts shape {tuple(counts.shape)}, expected {expected}")
        gamma = self.cfg.moe.bias_update_speed if gamma is None else gamma
        if gamma == 0:
            return
        for mod in self.moe_modules():
            update_bias(mod.router.bias, counts[mod.moe_index], gamma)


class ModelStage(StageForward):
    """A stage of a `DeepSeekV3` (see `DeepSeekV3.stage`): the model's own modules, registered
    under the same attribute names, so `named_parameters()` yields the single-process names."""

    def __init__(self, model: DeepSeekV3, layers, embed: bool, head: bool):
        super().__init__()
        self.owned = sorted(int(i) for i in layers)
        missing = [i for i in self.owned if str(i) not in model.layers]
        if missing:
            raise ValueError(f"stage blocks {missing}: the model holds only blocks {model.owned}")
        if (embed and not model.has_embed) or (head and not model.has_head):
            raise ValueError(f"a stage with embed={embed}, head={head} needs a model built with them "
                             f"(embed={model.has_embed}, head={model.has_head})")
        self.cfg, self.has_embed, self.has_head = model.cfg, embed, head
        self._model = [model]  # a list: the model is not a submodule of its stage
        self.embed = model.embed if needs_embedding(model.cfg, embed, head) else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in self.owned})
        if head:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp

    def make_context(self, batch) -> Context:
        return self._model[0].make_context(batch)

    @property
    def mtp_loss_weight(self) -> float:
        return self._model[0].mtp_loss_weight


def build_model(cfg, provider=None, dispatcher=None, layers=None, embed: bool = True,
                head: bool = True) -> DeepSeekV3:
    """Build (and init, unless on the meta device) the model or one pipeline stage of it."""
    model = DeepSeekV3(cfg, provider or LayerProvider(), dispatcher or LocalDispatcher(cfg.moe.num_experts),
                       layers=layers, embed=embed, head=head)
    init_weights(model, cfg.model.init_std, cfg.train.seed)
    return model
