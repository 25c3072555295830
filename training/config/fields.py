"""The typed-config mechanism every entry point shares (train, serve, eval).

A config is a dataclass whose fields carry a docstring each (litgpt's convention): the
docstring is the field's documentation and its `--help` text (training/config/cli.py).
Fields whose type is itself a dataclass are *sections* (`data`, `model`, `train`); the
others are top-level fields. Each section validates itself (`validate()`), the top level
checks what spans sections, and the whole runs before any cluster work starts, so a bad
value fails in a second with a message that names the field: `model.n_embd=100: ...`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, get_args, get_origin, get_type_hints

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config value is wrong. The message names the field."""


def check(ok: bool, name: str, value: Any, why: str) -> None:
    """Raise a ConfigError naming the field unless `ok`."""
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


class Config:
    """Base of a config dataclass: building from nested dicts, JSON, and validation by section.

    Subclasses are dataclasses; a section's class may define `validate(prefix)`, and the
    top-level class may override `check()` for checks that span sections."""

    @classmethod
    def sections(cls) -> dict[str, type]:
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}

    @classmethod
    def top_level(cls) -> tuple[str, ...]:
        sections = cls.sections()
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in sections)

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any], source: str = "config") -> C:
        cfg = cls()
        cfg.update(raw, source)
        return cfg

    def update(self, raw: dict[str, Any], source: str = "config") -> None:
        """Overlay a nested dict ({"train": {"max_steps": 10}}) onto this config."""
        sections, top = self.sections(), self.top_level()
        for key, value in raw.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: '{key}' must be a mapping")
                section = getattr(self, key)
                for k, v in value.items():
                    set_field(section, k, v, f"{source}: {key}.{k}")
            elif key in top:
                set_field(self, key, value, f"{source}: {key}")
            else:
                raise ConfigError(f"{source}: unknown key '{key}' (expected one of: {', '.join([*top, *sections])})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def validate(self: C) -> C:
        """Every section checks its own fields, then the top level checks the rest."""
        for name in self.sections():
            section = getattr(self, name)
            if hasattr(section, "validate"):
                section.validate(name)
        self.check()
        return self

    def check(self) -> None:
        """Checks of the top-level fields and across sections (none by default)."""


def resolve_path(p: str) -> Path:
    """Relative config paths are taken from the current folder, then from the repo root."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def preset_path(name_or_path: str, config_dir: Path = CONFIG_DIR) -> Path:
    """A YAML file given by path, or a preset by name from `config_dir`."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        return p
    candidate = config_dir / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(x.stem for x in config_dir.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{name_or_path}' (known: {', '.join(known)})")
    return candidate


# ---- typed field assignment ---------------------------------------------------------------


def set_field(obj: Any, name: str, value: Any, where: str) -> None:
    """Set obj.name = value, coercing strings from the CLI and checking the type."""
    hints = {k: v for k, v in get_type_hints(type(obj)).items() if not dataclasses.is_dataclass(v)}
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(obj) if f.name in hints)
        raise ConfigError(f"{where}: unknown field (known: {known})")
    setattr(obj, name, coerce(value, hints[name], where))


def coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Optional or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return coerce(value, inner, where)
    if hasattr(tp, "coerce_config_value"):  # a type that parses its own spellings (WorkerCount)
        return tp.coerce_config_value(value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}: must be one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: must be a list")
        return [coerce(v, args[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}={value!r}: must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: must be an integer")
        try:
            if isinstance(value, str):
                value = float(value.replace("_", "")) if any(c in value for c in ".eE") else int(value.replace("_", ""))
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r}: must be an integer") from None
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r}: must be a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: must be a string")
        return str(value)
    return value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (litgpt's convention)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs
