"""Offline tokenizers for the tiny models, trained with the `tokenizers` library on a small shipped corpus.

CLIP-style: lower-cased byte-level BPE with an end-of-word suffix, <|startoftext|>/<|endoftext|> specials.
T5-style: a Unigram model with <pad>/</s>/<unk>. Both are wrapped in the transformers classes the real models use, so
the saved folders are ordinary diffusers folders.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers


def _corpus(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines * 4  # repetition gives the trainers stable pair counts


def build_clip_tokenizer(corpus: str, vocab_size: int, model_max_length: int = 77, pad_token: str | None = None) -> Any:
    from transformers import CLIPTokenizer

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
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    kwargs: dict[str, Any] = {"model_max_length": model_max_length}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, **kwargs)


def build_t5_tokenizer(corpus: str, vocab_size: int, model_max_length: int = 512) -> Any:
    from transformers import T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Lowercase()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator(_corpus(corpus), trainer)
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


TOKENIZER_BUILDERS = {"clip": build_clip_tokenizer, "t5": build_t5_tokenizer}
