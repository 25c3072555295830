"""Entry point: `python training/run.py [--preset tiny] [flags]`.

Thin on purpose: parse and validate the config (fails in a second, before any Ray work),
then either run the data stage alone (`--prepare-only`) or the whole job (data stage,
distributed training, export). Works the same locally and under `ray job submit`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python training/run.py` puts training/ on sys.path, not the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config.cli import parse  # noqa: E402
from training.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse(argv, description=__doc__)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    from training import log_noise

    log_noise.configure(cfg.verbose)  # before Ray starts: a local cluster inherits it
    try:
        if args.prepare_only:
            from training.data.pipeline import prepare_data

            prepared = prepare_data(cfg)
            print(f"data ready under {prepared.root}: {prepared.stats_path}")
            return 0
        from training.train.job import run_job

        run_job(cfg)
        return 0
    except ConfigError as e:  # found while looking at the corpus or the cluster
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
