"""Offline tokenizers for the tiny models, trained with the `tokenizers` library on a small shipped corpus.

CLIP-style: lower-cased byte-level BPE with an end-of-word suffix, <|startoftext|>/<|endoftext|> specials.
T5-style: a Unigram model with <pad>/</s>/<unk>. Both are wrapped in the transformers classes the real models use, so
the saved folders are ordinary diffusers folders.

Training is not reproducible across processes (the trainers break ties between equally frequent pairs in hash-map
order, and Rust seeds its hash maps per process), and a different vocabulary means different token ids, so a
different image for the same seed on another machine or cache. So the trained vocabularies are shipped, frozen, in
configs/tiny/tokenizers/ (one file per kind, size and corpus digest) and every build reads them; training is the
fallback for a size or corpus without one (`python -m engine.loading.tiny` writes the files).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from ..paths import configs_dir

log = logging.getLogger(__name__)


def _corpus(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines * 4  # repetition gives the trainers stable pair counts


def frozen_path(kind: str, corpus: str, vocab_size: int) -> Path:
    digest = hashlib.sha256(corpus.encode()).hexdigest()[:12]
    return configs_dir() / "tiny" / "tokenizers" / f"{kind}-{vocab_size}-{digest}.json"


def _trained(kind: str, corpus: str, vocab_size: int) -> dict[str, Any]:
    """The shipped vocabulary for (kind, corpus, size), else a freshly trained one (not reproducible: see above)."""
    path = frozen_path(kind, corpus, vocab_size)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    log.warning("no frozen %s tokenizer of %d tokens for this corpus (%s): training one; token ids, and so tiny-model "
                "images, will differ from other builds (python -m engine.loading.tiny freezes them)", kind,
                vocab_size, path.name)
    return TRAINERS[kind](corpus, vocab_size)


def _train_clip(corpus: str, vocab_size: int) -> dict[str, Any]:
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(corpus), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [list(m) if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    return {"vocab": model["vocab"], "merges": merges}


def _train_t5(corpus: str, vocab_size: int) -> dict[str, Any]:
    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Lowercase()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator(_corpus(corpus), trainer)
    return {"vocab": [list(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]}


def build_clip_tokenizer(corpus: str, vocab_size: int, model_max_length: int = 77, pad_token: str | None = None) -> Any:
    from transformers import CLIPTokenizer

    model = _trained("clip", corpus, vocab_size)
    kwargs: dict[str, Any] = {"model_max_length": model_max_length}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    return CLIPTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], **kwargs)


def build_t5_tokenizer(corpus: str, vocab_size: int, model_max_length: int = 512) -> Any:
    from transformers import T5Tokenizer

    vocab = [tuple(piece) for piece in _trained("t5", corpus, vocab_size)["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


TRAINERS = {"clip": _train_clip, "t5": _train_t5}
TOKENIZER_BUILDERS = {"clip": build_clip_tokenizer, "t5": build_t5_tokenizer}

