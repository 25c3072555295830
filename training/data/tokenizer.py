"""Train (or load) the code tokenizer.

The course reuses GPT-2's tokenizer retrained on CodeSearchNet; here nothing can be
downloaded, so the job trains its own byte-level BPE with the `tokenizers` library on a
sample of the training split. Byte-level means every byte sequence is encodable: no
unknown tokens, whitespace and indentation survive a round trip exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from training.fim_format import SENTINELS

EOS = "<|endoftext|>"
# Fill-in-the-middle sentinels (training/fim_format.py). Always added: four ids cost nothing,
# and a model trained with data.fim_rate 0 can later be fine-tuned to infill with the same
# tokenizer.
FIM_TOKENS = SENTINELS


def train_tokenizer(texts: Iterable[str], vocab_size: int, context_length: int = 128,
                    fim_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE: end-of-text is bos, eos and pad; the FIM sentinels follow
    it (fim_tokens=False: the tokenizer of earlier runs, end-of-text only)."""
    fim = list(FIM_TOKENS) if fim_tokens else []
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, *fim],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                  pad_token=EOS, unk_token=EOS, model_max_length=context_length,
                                  additional_special_tokens=fim)
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token is None:
        raise ValueError(f"tokenizer at {path} has no eos token; the chunker needs one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
