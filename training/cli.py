"""Command-line flags generated from the typed config.

Every config field is a flag with the same name (`data.vocab_size` -> `--vocab-size`),
its help text is the field's docstring, and its default is "whatever the preset says",
so a flag given on the command line is the only thing that overrides a preset.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional, Sequence, get_args, get_origin, get_type_hints

from training.config import SECTIONS, TOP_LEVEL, ConfigError, JobConfig, field_docs

_UNSET = object()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(tp: Any) -> bool:
    return tp is bool or (get_origin(tp) is not None and bool in get_args(tp) and len(get_args(tp)) == 2
                          and type(None) in get_args(tp))


def build_parser(prog: str = "training/run.py", description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="tiny",
                        help="A preset under configs/ (tiny, gpt2-small) or a path to a YAML config.")
    parser.add_argument("--config", default=None, help="Alias of --preset for a YAML file path.")
    parser.add_argument("--prepare-only", action="store_true",
                        help="Run only the data stage: tokenizer + chunks under OUTPUT/.")
    parser.add_argument("--print-config", action="store_true",
                        help="Print the resolved config as JSON and exit.")
    top_docs = field_docs(JobConfig)
    for name in TOP_LEVEL:
        if name == "preset":
            continue
        parser.add_argument(_flag(name), dest=name, default=_UNSET, help=top_docs.get(name, ""))
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} (config section '{section}')")
        docs = field_docs(cls)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dest = f"{section}.{f.name}"
            help_text = docs.get(f.name, "").replace("%", "%%")
            if _is_bool(hints[f.name]):
                group.add_argument(_flag(f.name), dest=dest, default=_UNSET,
                                   action=argparse.BooleanOptionalAction, help=help_text)
                if f.name == "use_gpu":  # the spelling users know from other launchers
                    group.add_argument("--no-gpu", dest=dest, action="store_false", default=_UNSET,
                                       help="Same as --no-use-gpu.")
            else:
                group.add_argument(_flag(f.name), dest=dest, default=_UNSET, metavar=f.name.upper(),
                                   help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """Preset, then flags; coerced and type-checked by the config itself."""
    cfg = JobConfig.from_preset(args.config or args.preset)
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if value is _UNSET:
            continue
        if "." in dest:
            section, name = dest.split(".", 1)
            overrides.setdefault(section, {})[name] = value
        elif dest in TOP_LEVEL and dest != "preset":
            overrides[dest] = value
    cfg.update(overrides, source="command line")
    return cfg


def parse(argv: Optional[Sequence[str]] = None, **kw: Any) -> tuple[argparse.Namespace, JobConfig]:
    """Parse argv into (namespace, validated config). ConfigError on a bad value."""
    parser = build_parser(**kw)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    cfg.validate()
    return args, cfg


__all__ = ["build_parser", "config_from_args", "parse", "ConfigError"]
