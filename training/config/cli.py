"""Command-line flags generated from a typed config (training/config/fields.py).

Every config field is a flag with the same name (`data.vocab_size` -> `--vocab-size`),
its help text is the field's docstring, and its default is "whatever the preset says",
so a flag given on the command line is the only thing that overrides a preset. The
training job, the serving launcher and the evaluation CLI all build their parsers here.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional, Sequence, get_args, get_origin, get_type_hints

from training.config.fields import ConfigError, field_docs
from training.config.job import JobConfig

UNSET = object()  # "not given on the command line": the preset's (or the default's) value stands


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(tp: Any) -> bool:
    return tp is bool or (get_origin(tp) is not None and bool in get_args(tp) and len(get_args(tp)) == 2
                          and type(None) in get_args(tp))


def _add(group: Any, cls: type, name: str, dest: str, docs: dict[str, str], hints: dict[str, Any],
         aliases: dict[str, tuple[str, Any]], synonyms: dict[str, tuple[str, ...]]) -> None:
    help_text = docs.get(name, "").replace("%", "%%")
    names = (flag(name), *synonyms.get(name, ()))
    if _is_bool(hints[name]):
        group.add_argument(*names, dest=dest, default=UNSET, action=argparse.BooleanOptionalAction,
                           help=help_text)
    else:
        group.add_argument(*names, dest=dest, default=UNSET, metavar=name.upper(), help=help_text)
    if name in aliases:  # e.g. --no-gpu, the spelling users know from other launchers
        alias, const = aliases[name]
        group.add_argument(alias, dest=dest, action="store_const", const=const, default=UNSET,
                           help=f"Same as {flag(name)} {const}.")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                     aliases: Optional[dict[str, tuple[str, Any]]] = None,
                     synonyms: Optional[dict[str, tuple[str, ...]]] = None) -> None:
    """A flag for every field of `cls` (a Config): top-level fields first, then one group per section.
    aliases: field -> (flag, value) that sets it (`--no-gpu`); synonyms: field -> other spellings
    of its own flag (`--limit` for `--problems`)."""
    aliases, synonyms = aliases or {}, synonyms or {}
    docs, hints = field_docs(cls), get_type_hints(cls)
    for name in cls.top_level():  # type: ignore[attr-defined]
        if name not in skip:
            _add(parser, cls, name, name, docs, hints, aliases, synonyms)
    for section, scls in cls.sections().items():  # type: ignore[attr-defined]
        group = parser.add_argument_group(f"{section} (config section '{section}')")
        sdocs, shints = field_docs(scls), get_type_hints(scls)
        for f in dataclasses.fields(scls):
            _add(group, scls, f.name, f"{section}.{f.name}", sdocs, shints, aliases, synonyms)


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags given on the command line, as a nested dict for `Config.update`."""
    top, sections = cls.top_level(), cls.sections()  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if value is UNSET:
            continue
        if "." in dest:
            section, name = dest.split(".", 1)
            if section in sections:
                out.setdefault(section, {})[name] = value
        elif dest in top:
            out[dest] = value
    return out


# ---- the training job's command line ------------------------------------------------------


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
    add_config_flags(parser, JobConfig, skip=("preset",), aliases={"use_gpu": ("--no-gpu", False)})
    return parser


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """Preset, then flags; coerced and type-checked by the config itself.

    A --corpus given without --valid-corpus replaces the preset's validation corpus too: a
    preset's hub validation set belongs to the preset's corpus (gpt2-small: codeparrot-ds),
    and scoring another corpus on it would say little (and need the network). Validation is
    then the corpus's own hash split, and one line says so."""
    cfg = JobConfig.from_preset(args.config or args.preset)
    given = overrides(args, JobConfig)
    data = given.get("data", {})
    if "corpus" in data and "valid_corpus" not in data and cfg.data.valid_corpus is not None:
        print(f"[config] --corpus without --valid-corpus: validating on a {data.get('valid_fraction', cfg.data.valid_fraction)}"
              f" hash split of {data['corpus']}, not the preset's valid_corpus {cfg.data.valid_corpus}", flush=True)
        cfg.data.valid_corpus = None
    cfg.update(given, source="command line")
    return cfg


def parse(argv: Optional[Sequence[str]] = None, **kw: Any) -> tuple[argparse.Namespace, JobConfig]:
    """Parse argv into (namespace, validated config). ConfigError on a bad value."""
    parser = build_parser(**kw)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    cfg.validate()
    return args, cfg


__all__ = ["add_config_flags", "overrides", "build_parser", "config_from_args", "parse", "ConfigError", "UNSET"]
