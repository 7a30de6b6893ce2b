"""Token-based phases: a hyper-parameter as a function of the tokens seen so far.

DeepSeek-V3 states its pre-training recipe in tokens (arXiv 2412.19437, section 4.2): the
batch size ramps from 3,072 to 15,360 sequences over the first 469B tokens, the learning rate
holds until 10T tokens then decays by a cosine over 4.3T, the bias update speed drops to 0 for
the last 500B tokens, the MTP weight from 0.3 to 0.1 after 10T. A *phase list* writes one such
quantity as pieces in token order; each piece ends at `until_tokens` and is either

    {until_tokens: 10T, value: 2.2e-4}                                    a constant, or
    {until_tokens: 14.3T, from: 2.2e-4, to: 2.2e-5, shape: cosine}       a ramp (linear | cosine).

A piece covers [previous until_tokens, its until_tokens); the first starts at 0 and past the
last the final value holds. Token counts take K / M / B / T suffixes (powers of 1000, as the
report counts): `469B`, `14.633T`. `parse_phases` validates a list from YAML and `value_at`
evaluates it: a pure function of (phases, tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
SHAPES = ("linear", "cosine")


@dataclass(frozen=True)
class Piece:
    """One phase: `start` (inclusive) to `end` (exclusive) tokens, from `a` to `b` by `shape`
    (a constant has a == b)."""

    start: int
    end: int
    a: float
    b: float
    shape: str = "linear"

    def at(self, tokens: float) -> float:
        if self.a == self.b:
            return self.a
        x = min(max((tokens - self.start) / (self.end - self.start), 0.0), 1.0)
        if self.shape == "cosine":
            return self.b + 0.5 * (self.a - self.b) * (1 + math.cos(math.pi * x))
        return self.a + (self.b - self.a) * x

    @property
    def constant(self) -> bool:
        return self.a == self.b


def parse_tokens(value, where: str) -> int:
    """A token count: an integer, or a number with a K / M / B / T suffix ("469B", "14.8T")."""
    if isinstance(value, bool):
        raise ValueError(f"{where} = {value!r}: expected a token count such as 469B or 14.8T")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().upper().replace("_", "")
        scale = SUFFIXES.get(text[-1], 1.0)
        try:
            number = float(text[:-1] if text[-1] in SUFFIXES else text) * scale
        except ValueError:
            raise ValueError(f"{where} = {value!r}: not a token count; write a number with an optional "
                             "K, M, B or T suffix, e.g. 469B or 14.8T") from None
    else:
        raise ValueError(f"{where} = {value!r}: expected a token count such as 469B or 14.8T")
    if not math.isfinite(number) or number <= 0 or number > 1e18:
        raise ValueError(f"{where} = {value!r}: must be a positive token count (at most 1e18)")
    return int(round(number))


def format_tokens(tokens: float) -> str:
    """Tokens in the report's units: 469B, 14.8T, 1.5M."""
    for suffix, scale in reversed(SUFFIXES.items()):
        if abs(tokens) >= scale:
            return f"{tokens / scale:.4g}{suffix}"
    return f"{tokens:.0f}"


def _number(value, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 2.2e-4 (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} = {value!r}: expected a finite number")
    return float(value)


def parse_phases(raw, where: str, minimum: float = 0.0) -> tuple[Piece, ...]:
    """Validate a phase list read from YAML (see the module docstring); `where` names the field
    in errors, `minimum` is the smallest value allowed."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where} = {raw!r}: expected a list of pieces such as [{{until_tokens: 10T, value: 0.3}}, "
                         "{until_tokens: 14.8T, value: 0.1}]")
    pieces, start = [], 0
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{here} = {item!r}: expected a mapping {{until_tokens: N, value: v}} or "
                             "{until_tokens: N, from: a, to: b, shape: linear|cosine}")
        keys = set(map(str, item))
        if "value" in keys:
            allowed, need = {"until_tokens", "value"}, {"until_tokens", "value"}
        else:
            allowed, need = {"until_tokens", "from", "to", "shape"}, {"until_tokens", "from", "to"}
        if keys - allowed or need - keys:
            extra, missing = sorted(keys - allowed), sorted(need - keys)
            what = (f"unknown keys {extra}" if extra else "") + ("; " if extra and missing else "") + \
                (f"missing {missing}" if missing else "")
            raise ValueError(f"{here}: {what}; a piece is {{until_tokens, value}} or "
                             "{until_tokens, from, to[, shape]}")
        end = parse_tokens(item["until_tokens"], f"{here}.until_tokens")
        if end <= start:
            raise ValueError(f"{here}.until_tokens = {item['until_tokens']!r}: must be greater than where the piece "
                             f"starts ({format_tokens(start)}); list pieces in token order")
        if "value" in keys:
            a = b = _number(item["value"], f"{here}.value")
            shape = "linear"
        else:
            a, b = _number(item["from"], f"{here}.from"), _number(item["to"], f"{here}.to")
            shape = item.get("shape", "linear")
            if shape not in SHAPES:
                raise ValueError(f"{here}.shape = {shape!r}: must be 'linear' or 'cosine'")
        named = [("value", a)] if "value" in keys else [("from", a), ("to", b)]
        for name, v in named:
            if v < minimum:
                raise ValueError(f"{here}.{name} = {v!r}: must be >= {minimum:g}")
        pieces.append(Piece(start, end, a, b, shape))
        start = end
    return tuple(pieces)


def piece_index(phases: tuple[Piece, ...], tokens: float) -> int:
    """Index of the piece that holds `tokens` (the last one past its end)."""
    for i, p in enumerate(phases):
        if tokens < p.end:
            return i
    return len(phases) - 1


def value_at(phases: tuple[Piece, ...], tokens: float) -> float:
    """The scheduled value after `tokens` tokens; past the last piece its end value holds."""
    p = phases[piece_index(phases, tokens)]
    return p.b if tokens >= p.end else p.at(tokens)


def constant_until(phases: tuple[Piece, ...], tokens: float) -> float:
    """Tokens up to which the value stays what it is at `tokens` (inf past the last piece)."""
    i = piece_index(phases, tokens)
    if tokens >= phases[-1].end:
        return math.inf
    if not phases[i].constant:
        return tokens
    end = phases[i].end
    for p in phases[i + 1:]:  # following pieces with the same constant value
        if not (p.constant and p.a == phases[i].a):
            break
        end = p.end
    return math.inf if end >= phases[-1].end and phases[-1].constant and phases[-1].a == phases[i].a else end


def constant(value: float) -> tuple[Piece, ...]:
    """The phase list of a value that never changes."""
    return (Piece(0, 1, value, value),)
