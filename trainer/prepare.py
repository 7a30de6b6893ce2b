"""`python -m trainer.prepare CONFIG [--set section.key=value ...]`: prepare a run's data only.

Reads the training YAML (its `data:` and `dedup:` sections, with `base:` inheritance and
overrides), runs the data pipeline of `data.prepare` (read, normalise, dedup across dumps,
tokenize, pack, write Megatron indexed files) and prints the summary tables. When the output
directory already holds this config's data and no input changed since, it says so and does
nothing (`--force` prepares again).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from data.prepare import prepare, prepared_dir, stale_reason, summary_text
from trainer.config import load_config
from trainer.cli import user_errors


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None,
                        help="training YAML (its data: and dedup: sections are used); none = defaults")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="dotted overrides")
    parser.add_argument("--force", action="store_true", help="prepare again even when nothing changed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    cfg = load_config(args.config, args.set)
    data_cfg = dataclasses.replace(cfg.data, output_dir=prepared_dir(cfg.data, cfg.dedup))
    reason = stale_reason(data_cfg.output_dir, data_cfg, cfg.dedup)
    if reason is None and not args.force:
        print(f"up to date: {data_cfg.output_dir} holds this config's data and no input changed; "
              "nothing to do (--force prepares again)")
        return 0
    if reason != "not prepared yet":
        print(f"preparing again: {reason}", file=sys.stderr)
    report = prepare(data_cfg, cfg.dedup)
    print(summary_text(report))
    print(f"\nwrote {data_cfg.output_dir} (report: {os.path.join(data_cfg.output_dir, 'report.json')}) "
          f"in {report['seconds']:.1f}s")
    return 0



if __name__ == "__main__":
    sys.exit(main())
