"""The fill-in-the-middle contract between the data stage, the tokenizer, the exported
model folder and the service: the sentinel tokens, their order and `fim.json`.

StarCoder's spelling. The tokenizer always carries the four sentinels; the data stage
rewrites chunks with them (training/data/fim.py); the export writes `fim.json` beside
config.json (fim_rate 0: the model cannot infill); the service reads it back and builds
PSM prompts (serving/engine/fim.py). Torch-free and dependency-free on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from training.layout import FIM_FILE

PREFIX, MIDDLE, SUFFIX, PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
SENTINELS = (PREFIX, MIDDLE, SUFFIX, PAD)  # the tokenizer's order, after end-of-text
ROLES = ("prefix", "middle", "suffix", "pad")
FORMAT = "starcoder"  # sentinel spelling and SPM variant, written to the model folder


def fim_metadata(fim_rate: float, fim_spm_rate: float) -> dict[str, Any]:
    """What fim.json holds."""
    return {"fim_rate": fim_rate, "fim_spm_rate": fim_spm_rate, "format": FORMAT,
            "tokens": dict(zip(ROLES, SENTINELS))}


def write_fim_metadata(model_dir: str | Path, fim_rate: float, fim_spm_rate: float) -> Path:
    """fim.json beside config.json: fim_rate 0 says the checkpoint cannot infill."""
    path = Path(model_dir) / FIM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fim_metadata(fim_rate, fim_spm_rate), indent=2) + "\n", encoding="utf-8")
    return path


def read_fim_metadata(model_dir: str | Path) -> Optional[dict[str, Any]]:
    """fim.json as written, or None for a folder without one (an older or left-to-right model)."""
    path = Path(model_dir) / FIM_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def sentinel_names(meta: dict[str, Any]) -> dict[str, str]:
    """role -> token text, as fim.json names them (older files omit `tokens`)."""
    return meta.get("tokens") or dict(zip(ROLES, SENTINELS))
