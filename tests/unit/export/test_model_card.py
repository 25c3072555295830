"""The model card written into every exported OUTPUT/model/ (training/export/model_card.py)."""

from __future__ import annotations

import json
import shutil

from training.config import JobConfig
from training.export.model_card import read_metadata, render, write_model_card


def run_folder(tmp_path, tiny_checkpoint, corpus="huggingface-course/codeparrot-ds-train", fim_rate=None, **data):
    """A run folder with the files the job writes, shaped as the job writes them."""
    cfg = JobConfig.from_preset("tiny")
    if fim_rate is not None:
        cfg.data.fim_rate = fim_rate
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.data.corpus, cfg.data.dedup, cfg.data.keywords = corpus, True, ["pandas", "sklearn"]
    out = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, out / "model")
    (out / "data").mkdir()
    (out / "run_state.json").write_text(json.dumps({"run_name": "train_x", "config": cfg.to_dict()}))
    (out / "data" / "stats.json").write_text(json.dumps({
        "files_read": 730, "files_kept": 700, "files_skipped": {"too_large": 30}, "files_train": 665,
        "files_valid": 35, "chunks_train": 13000, "chunks_valid": 700, "vocab_size": 4096}))
    (out / "run.json").write_text(json.dumps({
        "workers": 2, "device": "cpu", "zero_stage": 2, "steps": 406, "max_steps": 406, "tokens_per_step": 8192,
        "train_tokens": 406 * 8192, "micro_batch_size": 32, "gradient_accumulation_steps": 1, "tokens_per_s": 5845.2, "final_train_loss": 3.81, "final_eval_loss": 3.72,
        "final_eval_perplexity": 41.26, "precision": "fp32", "parameters": 1_234_567, "train_seconds": 569.0,
        "wall_time_s": 651.0, "exported": {"step": 400, "eval_loss": 3.72}}))
    return out


def test_card_has_hub_metadata_and_every_section(tmp_path, tiny_checkpoint):
    out = run_folder(tmp_path, tiny_checkpoint)
    card = write_model_card(out)
    assert card == out / "model" / "README.md"
    meta = read_metadata(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "code" in meta["tags"] and meta["datasets"] == ["huggingface-course/codeparrot-ds-train"]
    assert "fill-in-the-middle" in meta["tags"]  # the tiny preset trains with fim_rate 0.5
    assert meta["metrics"] == ["perplexity"]
    (result,) = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"loss": 3.72, "perplexity": 41.26}
    text = card.read_text()
    for section in ("## Training data", "## Tokenizer", "## Fill in the middle", "## Architecture", "## Training", "## Results",
                    "## Evaluation"):
        assert section in text
    for fact in ("exact-duplicate removal", "keyword filter (pandas, sklearn)", "too_large: 30", "vocabulary 4,096",
                 "2 layers, 2 heads, width 128", "1,234,567 parameters", "32 x 1 x 2", "0.003, cosine, warmup 30",
                 "| final eval loss | 3.7200 |", "2 CPU worker(s), DeepSpeed ZeRO stage 2", "5845.2 tokens/s",
                 "Not evaluated yet"):
        assert fact in text, fact


def test_the_card_names_the_whole_data_recipe(tmp_path, tiny_checkpoint):
    """Near dedup, the cleaning recipe with its seed and the licence filter shape what the model
    saw: a reader of the card must be able to rebuild the data from it."""
    out = run_folder(tmp_path, tiny_checkpoint, near_dedup=0.85, clean="codeparrot", clean_seed=7,
                     licenses=["mit", "apache-2.0"])
    text = write_model_card(out).read_text()
    for fact in ("exact-duplicate removal", "near-duplicate removal (MinHash, Jaccard >= 0.85)",
                 "the `codeparrot` cleaning recipe (seed 7)", "licences `mit`, `apache-2.0`"):
        assert fact in text, fact
    assert "CodeParrot quality filters" not in text  # the recipe includes them: not named twice


def test_a_local_corpus_is_not_claimed_as_a_hub_dataset(tmp_path, tiny_checkpoint):
    out = run_folder(tmp_path, tiny_checkpoint, corpus=str(tmp_path), fim_rate=0.0)
    meta = read_metadata(write_model_card(out))
    assert "datasets" not in meta
    assert "fill-in-the-middle" not in meta["tags"] and "it cannot fill in the middle" in render(out)
    # The card still says where the data came from.
    assert f"Corpus: `{tmp_path}`" in render(out)


def test_the_folder_with_its_card_still_loads(tmp_path, tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_folder(tmp_path, tiny_checkpoint)
    write_model_card(out)
    assert AutoModelForCausalLM.from_pretrained(str(out / "model")).config.n_positions == 128
    assert AutoTokenizer.from_pretrained(str(out / "model")).eos_token == "<|endoftext|>"


def test_a_model_without_its_run_records_gets_a_card_that_invents_nothing(tmp_path):
    (tmp_path / "model").mkdir()
    text = write_model_card(tmp_path, evaluation={"perplexity": {"loss": 3.2, "perplexity": 24.5, "tokens": 3048,
                                                                  "corpus": "held-out", "split": "all"}}).read_text()
    assert "Unknown: no `run.json`" in text and "None" not in text
    assert "Held-out loss 3.2000, perplexity 24.50 on 3,048 tokens of held-out (all)" in text
    assert read_metadata(tmp_path / "model" / "README.md")["metrics"] == ["perplexity"]
