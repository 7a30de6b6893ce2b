"""The run config: one dataclass per component, loaded strictly from YAML.

A YAML file has one mapping per section (`model:`, `moe:`, `optim:` ...). Loading is strict:
an unknown section or key is an error naming it and the closest valid name. `base: other.yaml`
inherits another file (paths relative to the including file, chains allowed), and dotted
overrides (`--set optim.lr=3e-4 moe.topk=6`) are applied last. Each component validates its
own fields; `Config.validate` checks what spans sections. YAML is only the serialisation:
`to_dict` / `dump_yaml` write the fully resolved config beside checkpoints and in the log.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass

import yaml

from data.config import DataConfig
from data.dedup.config import DedupConfig
from parallel.config import ParallelConfig
from parallel.fault import FaultConfig
from parallel.profiling import ProfileConfig
from parallel.fp8.config import FP8Config
from model.config import AttentionConfig, ModelConfig, MoEConfig, MTPConfig, doc, require
from parallel.pipeline.layout import num_stages, resolve_layout
from trainer.config_files import similar_file, with_location
from trainer.phases import parse_phases, parse_tokens


class ConfigError(ValueError):
    """A user error in a config file or override; the message names field, value and fix."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with fp32 master weights (DeepSeek-V3 section 4.2 hyper-parameters as reference)."""

    lr: float = doc(3e-3, "Peak learning rate (DeepSeek-V3: 2.2e-4).")
    min_lr: float = doc(3e-4, "Learning rate at the end of the decay.")
    beta1: float = doc(0.9, "AdamW beta1.")
    beta2: float = doc(0.95, "AdamW beta2.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    weight_decay: float = doc(0.1, "Decoupled weight decay (not applied to norms, biases and router bias).")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    bf16_moments: bool = doc(False, "Keep AdamW moments in bf16 (DeepSeek-V3 section 3.3.3).")
    grad_reduce_dtype: str = doc("fp32", "Dtype of the data-parallel gradient reduce-scatter: fp32 (gradients "
                                         "upcast, then summed) or bf16 (half the bytes, summed in bf16). The "
                                         "received shard is upcast to fp32 for the norm and AdamW.")

    def __post_init__(self):
        require(self.lr > 0, "lr", self.lr, "must be positive")
        require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be between 0 and lr ({self.lr})")
        require(0 <= self.beta1 < 1, "beta1", self.beta1, "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        require(self.eps > 0, "eps", self.eps, "must be positive")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = no clipping)")
        require(self.grad_reduce_dtype in ("fp32", "bf16"), "grad_reduce_dtype", self.grad_reduce_dtype,
                "must be fp32 or bf16")


# What `schedule.phases` may schedule, with the smallest value each allows.
SCHEDULABLE = {"optim.lr": 0.0, "train.global_batch": 1.0, "moe.bias_update_speed": 0.0, "mtp.loss_weight": 0.0,
               "moe.seq_aux_loss_alpha": 0.0}


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule in steps, and token-based phases of any scheduled quantity (trainer.phases)."""

    kind: str = doc("cosine", "cosine (warmup then cosine to min_lr) or wsd (DeepSeek-V3: warmup, constant, cosine decay).")
    warmup_steps: int = doc(20, "Linear warmup steps from 0 to lr (with phases of optim.lr: to the phased lr).")
    constant_steps: int = doc(0, "wsd only: steps held at lr after warmup before the decay starts.")
    decay_steps: int = doc(0, "Steps of cosine decay to min_lr after warmup (+constant); 0 = until the last step.")
    phases: dict = doc({}, "Token-based phases: field -> list of pieces in token order, each "
                           "{until_tokens: N, value: v} or {until_tokens: N, from: a, to: b, shape: linear|cosine} "
                           "(N takes K/M/B/T suffixes). Fields: optim.lr (replaces kind/min_lr; warmup_steps "
                           "still applies), train.global_batch (sequences per step), moe.bias_update_speed, "
                           "mtp.loss_weight, moe.seq_aux_loss_alpha. A phased field's own value is not used. A config "
                           "inheriting this one (base:) replaces the whole mapping ({} clears it).")

    def __post_init__(self):
        require(self.kind in ("cosine", "wsd"), "kind", self.kind, "must be 'cosine' or 'wsd'")
        for name in ("warmup_steps", "constant_steps", "decay_steps"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        self._pieces = {}
        for key, raw in self.phases.items():
            require(key in SCHEDULABLE, "phases", key, f"not a schedulable field; use one of {', '.join(SCHEDULABLE)}")
            self._pieces[key] = parse_phases(raw, f"phases[{key!r}]", SCHEDULABLE[key])
        if "optim.lr" in self._pieces:
            for name in ("constant_steps", "decay_steps"):
                require(getattr(self, name) == 0, name, getattr(self, name),
                        "the step schedule's decay does not apply when phases set optim.lr; remove it "
                        "(warmup_steps still applies)")

    @property
    def phased(self) -> dict:
        """field -> parsed phase list, for every phased field."""
        return dict(self._pieces)

    def pieces(self, field: str):
        """The parsed phase list of `field` (a key of SCHEDULABLE), or None when it is not phased."""
        return self._pieces.get(field)


@dataclass(kw_only=True)
class TrainConfig:
    """The training run."""

    steps: int = doc(200, "Optimizer steps to run; 0 = no step limit (train.tokens ends the run).")
    tokens: int | str = doc(0, "Tokens to train on (sequences x data.seq_len; K/M/B/T suffixes, e.g. 14.8T); the "
                               "run ends at the first step that reaches them, or at train.steps if sooner; 0 = no limit.")
    micro_batch_size: int = doc(8, "Sequences per micro-batch per data-parallel rank.")
    grad_accum: int = doc(1, "Micro-batches per optimizer step (also the pipeline's micro-batch count); with "
                             "train.global_batch set it follows from that.")
    global_batch: int = doc(0, "Sequences per optimizer step over all dp ranks; 0 = dp x micro_batch_size x grad_accum. "
                               "Rounded down to a multiple of dp x micro_batch_size (at least the schedule's minimum "
                               "micro-batches); schedule.phases may ramp it.")
    seed: int = doc(0, "Seed of parameter init and everything random in the run.")
    device: str = doc("auto", "auto (cuda if available, else cpu), cpu or cuda.")
    dtype: str = doc("auto", "Compute dtype: auto (bf16 autocast on CUDA or with bf16 parameters, fp32 on CPU), "
                             "fp32 or bf16.")
    param_dtype: str = doc("fp32", "Dtype of the model's parameters and gradients: fp32 or bf16 (then the fp32 master "
                                   "weights and AdamW moments live only in the optimizer, sharded by ZeRO-1, and the "
                                   "parameter all-gather runs in bf16). bf16 needs bf16 compute (train.dtype bf16 "
                                   "or auto). Default fp32: bf16 parameters are not measured on a GPU yet.")
    output_dir: str = doc("runs/tiny", "Where logs, metrics and checkpoints go.")
    on_nan: str = doc("halt", "On a non-finite loss or gradient: halt (save nothing; one error line naming the parameter, exit 2) or skip (drop the step; halt as above after max_nan_skips).")
    max_nan_skips: int = doc(10, "With on_nan=skip, halt after this many skipped steps.")
    compile: bool = doc(False, "torch.compile each transformer block (one graph per block, shared by all layers; "
                                "under a pipeline, each block's compute pieces).")
    recompute: str = doc("none", "Activation recomputation: none, selective (RMSNorm, MLA up-projections, "
                                 "SwiGLU activation; DeepSeek-V3 section 3.2.3) or full (whole blocks).")

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        require(self.steps >= 0, "steps", self.steps, "must be >= 0 (0 = no step limit, then set train.tokens)")
        require(self.global_batch >= 0, "global_batch", self.global_batch, "must be >= 0 (0 = from grad_accum)")
        if self.tokens not in (0, "0"):
            self.tokens = parse_tokens(self.tokens, "tokens")
        else:
            self.tokens = 0
        require(self.steps > 0 or self.tokens > 0, "steps", self.steps,
                "and train.tokens are both 0; set train.steps or train.tokens (e.g. 14.8T) to end the run")
        require(self.device in ("auto", "cpu", "cuda"), "device", self.device, "must be auto, cpu or cuda")
        require(self.dtype in ("auto", "fp32", "bf16"), "dtype", self.dtype, "must be auto, fp32 or bf16")
        require(self.param_dtype in ("fp32", "bf16"), "param_dtype", self.param_dtype, "must be fp32 or bf16")
        require(not (self.param_dtype == "bf16" and self.dtype == "fp32"), "param_dtype", self.param_dtype,
                "needs bf16 compute, but train.dtype = 'fp32' (fp32 autocast cannot multiply bf16 weights); set "
                "train.dtype=bf16 (or auto), or train.param_dtype=fp32")
        require(self.on_nan in ("halt", "skip"), "on_nan", self.on_nan, "must be 'halt' or 'skip'")
        require(self.recompute in ("none", "selective", "full"), "recompute", self.recompute,
                "must be none, selective or full")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpointing and resume."""

    every: int = doc(100, "Save every N steps (and at the end); 0 = only at the end.")
    keep_last: int = doc(2, "Keep this many most recent checkpoints; older ones are deleted.")
    resume: str = doc("auto", "auto (latest in output_dir if any), none, or a checkpoint directory.")
    async_save: bool = doc(False, "Write checkpoints in a background thread, at every layout: each rank copies what it writes (its shards, its share of the replicated tensors) to host memory and training goes on; the next save waits for this one.")
    init_from: str = doc("", "Start this run (a stage, e.g. a long-context extension) from another run's final weights: its train.output_dir (latest checkpoint) or a checkpoint directory, relative to the working directory. Fresh step, schedule and data position; a checkpoint of this run's own output_dir wins (resume).")
    init_optimizer: bool = doc(False, "With init_from: also load the parent's AdamW state (default: fresh moments).")

    def __post_init__(self):
        require(self.every >= 0, "every", self.every, "must be >= 0")
        require(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1")


@dataclass(kw_only=True)
class LoggingConfig:
    """Console, JSONL and TensorBoard logging."""

    every: int = doc(10, "Print a console line every N steps (metrics.jsonl gets every step).")
    tensorboard: bool = doc(True, "Write TensorBoard event files under output_dir/tb.")
    plots: bool = doc(True, "Draw the run's plots into output_dir/plots at the end (about 2 s); python -m trainer.plot draws them later.")
    peak_tflops: float = doc(0.0, "Peak dense TFLOP/s per device for MFU; 0 = look up from the device (CPU: 1.0).")
    wandb: dict = doc({}, "Weights & Biases, beside TensorBoard: {project: NAME, name: RUN_NAME, offline: true, entity: TEAM}; {} = off. Needs the wandb package (imported only when set).")

    def __post_init__(self):
        from trainer.wandb_log import check_settings
        require(self.every >= 1, "every", self.every, "must be >= 1")
        check_settings(self.wandb)
        require(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "must be >= 0")


@dataclass(kw_only=True)
class EvalConfig:
    """Validation during training on the held-out split (needs data.valid_fraction > 0)."""

    every: int = doc(100, "Validate every N steps and after the last step; 0 = never.")
    batches: int = doc(4, "Micro-batches of train.micro_batch_size per validation (the first ones of the split, the same every time).")

    def __post_init__(self):
        require(self.every >= 0, "every", self.every, "must be >= 0 (0 = no validation)")
        require(self.batches >= 1, "batches", self.batches, "must be >= 1")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "attention": AttentionConfig, "moe": MoEConfig, "mtp": MTPConfig,
    "parallel": ParallelConfig, "fp8": FP8Config, "data": DataConfig, "dedup": DedupConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "train": TrainConfig, "checkpoint": CheckpointConfig,
    "logging": LoggingConfig, "eval": EvalConfig, "fault": FaultConfig,
    "profile": ProfileConfig,
}


@dataclass(kw_only=True)
class Config:
    """The whole run. Every section has defaults, so an empty YAML is the tiny CPU run."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    mtp: MTPConfig = dataclasses.field(default_factory=MTPConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    fp8: FP8Config = dataclasses.field(default_factory=FP8Config)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    fault: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)

    def validate(self) -> "Config":
        """Checks that span sections; raises ConfigError naming both fields."""
        m, a, moe = self.model, self.attention, self.moe
        if self.data.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len = {self.data.seq_len}: must be <= model.max_seq_len "
                              f"({m.max_seq_len}), the length of the RoPE tables; raise model.max_seq_len (a context "
                              "extension also sets attention.rope_scaling) or lower data.seq_len")
        if a.yarn and a.yarn["original_max_position_embeddings"] > m.max_seq_len:
            raise ConfigError(f"attention.rope_scaling.original_max_position_embeddings = "
                              f"{a.yarn['original_max_position_embeddings']}: must be <= model.max_seq_len "
                              f"({m.max_seq_len}); set it to the pre-extension context and model.max_seq_len "
                              "to the extended one")
        batch_set = self.train.global_batch > 0 or self.schedule.pieces("train.global_batch") is not None
        if batch_set and self.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum = {self.train.grad_accum}: with train.global_batch (or its phases) "
                              "set, the micro-batches per step follow from it (global_batch / (dp x "
                              "micro_batch_size)); leave train.grad_accum at 1")
        if not batch_set and self.parallel.pp > 1 and self.parallel.schedule in ("dualpipe", "dualpipev") \
                and self.train.grad_accum < 2 * self.parallel.pp:
            raise ConfigError(f"train.grad_accum = {self.train.grad_accum}: {self.parallel.schedule} needs at "
                              f"least 2 * parallel.pp ({2 * self.parallel.pp}) micro-batches")
        if self.parallel.schedule == "dualpipe" and self.parallel.pp > 1 and \
                (self.parallel.pp % 2 or (self.train.grad_accum % 2 and not batch_set)):
            raise ConfigError(f"parallel.schedule = 'dualpipe': needs an even parallel.pp ({self.parallel.pp}) "
                              f"and an even train.grad_accum ({self.train.grad_accum})")
        if self.parallel.layout:
            stages = num_stages(self.parallel.schedule, self.parallel.pp)
            try:
                resolve_layout(self.parallel.layout, m.num_layers, stages)
            except ValueError as e:
                raise ConfigError(f"parallel.{e} (parallel.pp = {self.parallel.pp}, parallel.schedule = "
                                  f"{self.parallel.schedule})") from None
        if moe.num_experts % self.parallel.ep:
            raise ConfigError(f"moe.num_experts = {moe.num_experts}: must be divisible by parallel.ep "
                              f"({self.parallel.ep})")
        if m.first_k_dense < m.num_layers and moe.expert_ffn_size <= 0:
            raise ConfigError("moe.expert_ffn_size must be positive when the model has MoE layers")
        del a
        return self


# --------------------------------------------------------------------------- loading


def _closest(name: str, options, prefix: str = "") -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    return f"; valid names: {', '.join(sorted(options))}"


def _coerce(value, tp, where: str, strings: bool = False):
    """Check a YAML scalar against a field's annotated type; ints are accepted for floats.
    `strings`: the field is a list of strings (its default is), so every item must be one."""
    origin = typing.get_origin(tp) or tp
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            pass
    if origin is int and isinstance(value, str) and _is_number(value):
        raise ConfigError(f"{where} = {value!r}: YAML reads {value} as a string, not a number (YAML 1.1 "
                          f"needs a dot in floats and integers have no exponent); write it as {_as_int(value)}")
    if origin is int and isinstance(value, float) and value.is_integer():
        raise ConfigError(f"{where} = {value!r}: expected an integer, got a float; write {int(value)}")
    if origin is str and isinstance(value, bool):
        value = "on" if value else "off"  # YAML 1.1 reads on / off / yes / no as booleans
    if origin in (int, float, str, bool, list, dict) and not isinstance(value, origin) \
            or (origin is int and isinstance(value, bool)):
        raise ConfigError(f"{where} = {value!r}: expected {origin.__name__}, got {type(value).__name__}; "
                          f"write {_EXAMPLES.get(origin, 'a value of that type')}")
    if origin is list and strings and not all(isinstance(v, str) for v in value):
        bad = next(v for v in value if not isinstance(v, str))
        raise ConfigError(f"{where} = {value!r}: every item must be a string, got {type(bad).__name__} "
                          f"{bad!r}; write a flat list such as [a, b]")
    if origin is float and not math.isfinite(value):
        raise ConfigError(f"{where} = {value!r}: must be a finite number")
    return value


def _is_string_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _as_int(text: str) -> str:
    number = float(text)
    return str(int(number)) if number.is_integer() else f"an integer (not {text})"


def section_from_dict(cls: type, raw, section: str):
    """Build one component dataclass from a mapping, strictly."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping of fields, got {type(raw).__name__} ({raw!r})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    string_lists = {f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING
                    and _is_string_list(f.default_factory())}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"unknown key '{section}.{key}'{_closest(str(key), names, section + '.')}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", key in string_lists)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{section}.{e}") from None


def config_from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"unknown section '{key}'{_closest(str(key), SECTIONS)}")
    parts = {name: section_from_dict(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    return Config(**parts).validate()


REPLACED_WHOLE = ("phases",)  # mapping fields a child config replaces instead of merging into


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED_WHOLE:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


MAX_CONFIG_VALUES = 100_000


def check_expanded_size(raw, where: str) -> None:
    """Refuse a document whose aliases (&a / *a) expand to more than MAX_CONFIG_VALUES values.

    PyYAML shares one object per alias, so loading is cheap; the copies made later are not (a
    nine-level alias bomb expands to a billion values). Sizes are counted per distinct object.
    """
    sizes: dict[int, int] = {}

    def size(obj) -> int:
        if id(obj) in sizes:
            return sizes[id(obj)]
        sizes[id(obj)] = MAX_CONFIG_VALUES + 1  # a self-referencing alias counts as too big
        children = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else \
            obj if isinstance(obj, list) else []
        total = 1
        for child in children:
            total = min(total + size(child), MAX_CONFIG_VALUES + 1)
        sizes[id(obj)] = total
        return total

    try:
        too_big = size(raw) > MAX_CONFIG_VALUES
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply to be a config") from None
    if too_big:
        raise ConfigError(f"{where}: YAML aliases expand to more than {MAX_CONFIG_VALUES:,} values; a config "
                          "holds a few hundred; remove the repeated anchors (&name / *name)")


def read_yaml_tree(path: str, _seen: tuple = ()) -> dict:
    """Read a YAML file, resolving `base:` inheritance (relative to the file) recursively."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: 'base' inheritance loops back to itself via {' -> '.join(_seen)}")
    if not os.path.isfile(path):
        raise ConfigError(f"config = {path!r}: no such file; give the path of a YAML config (see configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(f"config = {path!r}: not valid YAML at {where}: {e.problem or e.context}; fix the syntax "
                          "there") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to be a config") from None
    check_expanded_size(raw, f"config = {path!r}")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at top level, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path, got {base!r}")
    parent = read_yaml_tree(os.path.join(os.path.dirname(path), base), _seen + (path,))
    return _deep_merge(parent, raw)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values are parsed as YAML scalars."""
    out = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value, e.g. optim.lr=3e-4")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override '{item}': expected section.key=value, e.g. moe.topk=6")
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError):
            value = text
        check_expanded_size(value, f"override = {item!r}")
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"override '{item}': section '{parts[0]}' is not a mapping")
        section[parts[1]] = value
    return out


_EXAMPLES = {int: "a whole number such as 200", float: "a number such as 3.0e-4", bool: "true or false",
             str: "a string", list: "a list such as [a, b]", dict: "a mapping such as {key: value}"}


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The one way to get a Config: file (with `base:`) + dotted overrides, validated."""
    if path and not os.path.isfile(path):
        raise ConfigError(f"config = {path!r}: no such file; "
                          f"{similar_file(path) or 'give the path of a YAML config (see configs/)'}")
    raw = read_yaml_tree(path) if path else {}
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(with_location(str(e), path, overrides or [])) from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
