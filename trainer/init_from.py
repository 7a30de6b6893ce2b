"""Start a training stage from another run's final weights: `checkpoint.init_from`.

A long-context extension (DeepSeek-V3 section 4.3: 4K -> 32K -> 128K, 1,000 steps each) is a
new run that begins with the weights of the previous stage but its own step counter, learning
rate schedule and data position; unlike a resume, nothing but the weights (and, with
`checkpoint.init_optimizer: true`, the AdamW moments) carries over. The RoPE tables are not part
of a checkpoint, so a stage may raise `model.max_seq_len` and set `attention.rope_scaling`; any
field that shapes a parameter must match the parent's and is named when it does not.

When the run's own output directory already holds a checkpoint, resume wins: a stage that was
interrupted continues from its own step, and the log says that `init_from` was not used.
"""
from __future__ import annotations

import json
import logging
import os

from parallel import checkpoint as ckpt
from trainer.config import Config, ConfigError

log = logging.getLogger("moepipe")

# Fields that change a parameter's shape or the set of parameters; the rest (max_seq_len,
# rope_scaling, rope_theta, routing and loss weights) may change from one stage to the next.
SHAPE_FIELDS = ("model.vocab_size", "model.hidden_size", "model.num_layers", "model.first_k_dense",
                "model.dense_ffn_size", "model.tie_embeddings", "attention.num_heads", "attention.q_lora_rank",
                "attention.kv_lora_rank", "attention.qk_nope_head_dim", "attention.qk_rope_head_dim",
                "attention.v_head_dim", "moe.num_experts", "moe.num_shared_experts", "moe.expert_ffn_size",
                "mtp.depth")


def parent_checkpoint(where: str) -> str:
    """The checkpoint named by `checkpoint.init_from`: a checkpoint directory, or a run's output
    directory (its latest checkpoint, i.e. the run's final weights once it has finished)."""
    if os.path.isfile(os.path.join(where, "manifest.json")):
        return where
    if not os.path.isdir(where):
        raise ConfigError(f"checkpoint.init_from = {where!r}: no such run or checkpoint directory; train the "
                          "parent stage first or give the path of its train.output_dir")
    latest = ckpt.latest_checkpoint(os.path.join(where, "checkpoints"))
    if latest is None:
        raise ConfigError(f"checkpoint.init_from = {where!r}: holds no complete checkpoint (looked in "
                          f"{os.path.join(where, 'checkpoints')}); finish the parent stage first")
    return latest


def shape_changes(checkpoint: str, cfg: Config) -> list[str]:
    """'section.field: parent -> this' for every parameter-shaping field that differs."""
    from trainer.preflight import model_changes
    return [c for c in model_changes(checkpoint, cfg) if c.split(":")[0] in SHAPE_FIELDS]


def shape_changes_between(parent: Config, cfg: Config) -> list[str]:
    """The same comparison between two configs (a stage config and its parent's)."""
    from trainer.config import to_dict
    from trainer.preflight import config_changes
    return [c for c in config_changes(to_dict(parent), cfg) if c.split(":")[0] in SHAPE_FIELDS]


def check_shape(checkpoint: str, cfg: Config) -> None:
    changes = shape_changes(checkpoint, cfg)
    if changes:
        first = changes[0].split(":")[0]
        section, field = first.split(".")
        value = getattr(getattr(cfg, section), field)
        raise ConfigError(f"{first} = {value!r}: checkpoint.init_from = {cfg.checkpoint.init_from!r} holds a model "
                          f"of another shape ({'; '.join(changes)}); set these fields to the parent's values "
                          "(inherit them with base: <parent config>) or start from a parent of this shape")


def _parent_steps(checkpoint: str) -> int | None:
    from trainer.preflight import _saved_config
    steps = (_saved_config(checkpoint).get("train") or {}).get("steps")
    return steps if isinstance(steps, int) else None


class WeightsOnly:
    """An engine seen through its model tensors only: loading through it leaves the optimizer fresh
    (every engine resets its moments when a load carries no `optim.*` tensors)."""

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict:
        return {k: v for k, v in self.engine.state_dict().items() if k.startswith("model.")}

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)


def load_parent(run, checkpoint: str, with_optimizer: bool) -> None:
    """Weights (and optionally the optimizer state) of `checkpoint` into the run's engine, at any
    layout; the step, data position and RNG of the run stay fresh (the returned extras are dropped)."""
    if with_optimizer:
        if ckpt.load(checkpoint, run.engine) is None:
            raise ConfigError(f"checkpoint.init_optimizer = true: {checkpoint} holds weights only; set "
                              "checkpoint.init_optimizer=false")
        return
    ckpt.load(checkpoint, WeightsOnly(run.engine))


def packing_note(run) -> str:
    """How the stream re-packs the corpus at this stage's length (from the prepared report)."""
    dirs = getattr(run.stream, "dirs", None)
    path = os.path.join(dirs[0], "report.json") if dirs else ""
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        stats = json.load(f).get("packing") or {}
    if "docs" not in stats:
        return ""
    return (f"; data packed at data.seq_len = {run.cfg.data.seq_len}: {stats['docs_longer_than_seq']} of "
            f"{stats['docs']} documents are longer and split into {run.cfg.data.seq_len}-token pieces, the "
            "others are kept whole")


def start_stage(run, cfg: Config, resumed: str | None) -> None:
    """Apply `checkpoint.init_from` to a freshly built run (no-op without it or after a resume)."""
    where = cfg.checkpoint.init_from
    if not where:
        return
    if resumed:
        log.info("checkpoint.init_from = %r not used: this run resumes from its own checkpoint %s (resume wins; "
                 "to start the stage again, use another train.output_dir)", where, resumed)
        return
    checkpoint = parent_checkpoint(where)
    check_shape(checkpoint, cfg)
    load_parent(run, checkpoint, cfg.checkpoint.init_optimizer)
    step, planned = ckpt.step_of(checkpoint), _parent_steps(checkpoint)
    if step is not None and planned is not None and step < planned:
        log.warning("checkpoint.init_from = %r: its latest checkpoint is step %d of the %d it was configured for; "
                    "the parent stage has not finished", where, step, planned)
    log.info("new stage from %s (parent step %s): weights%s loaded; step 0, fresh schedule and data "
             "position%s", checkpoint, step, " and optimizer state" if cfg.checkpoint.init_optimizer
             else " (fresh optimizer)", packing_note(run))
