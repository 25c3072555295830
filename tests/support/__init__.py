"""Helpers the tests share: real servers, real clusters, real corpora and checkpoints."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
