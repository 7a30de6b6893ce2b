"""Progress lines per stage and the end-of-run summary tables of `python -m trainer.prepare`.

`StageProgress` shows, per stage, units done / total, documents/s, MB/s and the ETA on stderr
while the stage runs (redrawn in place on a terminal, a line every half second otherwise).
`summary_text(report)` renders the JSON report as tables (per stage with its unit count, per
dump, packing totals) and a line of bad-input counts per reason.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{v:,}" if isinstance(v, int) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_text(report: dict) -> str:
    stages = _table(["stage", "units", "docs in", "docs out", "MB", "s", "MB/s"],
                    [[r["stage"], r.get("units", 1), r["docs_in"], r["docs_out"], r["mb"], r["seconds"], r["mb_per_s"]]
                     for r in report["stages"]])
    dumps = _table(["dump", "read", "bad", "duplicates", "kept"],
                   [[d["dump"], d["read"], d["bad"], d["duplicates"], d["kept"]] for d in report["dumps"]])
    p = report["packing"]
    totals = _table(["tokens", "sequences", "padding", "docs cut", "longer than L", "tokenizer", "fast path"],
                    [[p["tokens"], p["sequences"], f"{100 * p['padding_fraction']:.3f}%",
                      f"{p['docs_cut']} ({100 * p['docs_cut_fraction']:.2f}%)", p["docs_longer_than_seq"],
                      report["tokenizer"]["spec"], "tiktoken" if report["tokenizer"]["fast_path"] else "no"]])
    bad = report["bad_input"]["by_reason"]
    bad_line = ", ".join(f"{k}: {v}" for k, v in bad.items()) if bad else "none"
    return "\n\n".join([stages, dumps, totals, f"bad input: {bad_line}",
                        f"packing {report['packing_mode']} at L = {report['seq_len']}; "
                        f"train {report['sequences']['train']} / valid {report['sequences']['valid']} sequences"])


@dataclass
class StageProgress:
    """Progress of one sharded stage: units done / total, documents/s, MB/s and ETA on stderr."""

    name: str
    total: int
    quiet: bool = False
    done: int = 0
    docs: int = 0
    nbytes: int = 0
    _t0: float = field(default_factory=time.perf_counter, repr=False)
    _last: float = field(default=0.0, repr=False)

    def update(self, stats: dict) -> None:
        self.done += 1
        self.docs += int(stats.get("docs", 0))
        self.nbytes += int(stats.get("bytes", 0))
        now = time.perf_counter()
        if self.quiet or (now - self._last < 0.5 and self.done < self.total):
            return
        self._last = now
        sys.stderr.write(("\r" if sys.stderr.isatty() else "") + self.line() + ("" if sys.stderr.isatty() else "\n"))
        sys.stderr.flush()

    def line(self) -> str:
        secs = max(time.perf_counter() - self._t0, 1e-9)
        eta = secs / self.done * (self.total - self.done) if self.done else float("nan")
        return (f"[{self.name:>9}] units {self.done}/{self.total}  {self.docs / secs:,.0f} docs/s  "
                f"{self.nbytes / 1e6 / secs:,.2f} MB/s  elapsed {secs:.1f}s  ETA {eta:.0f}s")

    def close(self) -> float:
        secs = time.perf_counter() - self._t0
        if not self.quiet and sys.stderr.isatty():
            sys.stderr.write("\n")
        return secs
