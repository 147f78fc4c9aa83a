"""The tiny models' tokenizers are the same on every build: their vocabularies are shipped frozen (training is not
reproducible across processes), so the same tiny model and seed give the same image on every machine and cache."""

from __future__ import annotations

import json
import subprocess
import sys

from engine.loading.tiny import tokenizer_specs
from engine.loading.tokenizers import TOKENIZER_BUILDERS, frozen_path

PROMPT = "a lighthouse at dusk, oil painting"


def test_every_tiny_tokenizer_is_shipped_frozen():
    specs = tokenizer_specs()
    assert {kind for kind, _, _ in specs} == set(TOKENIZER_BUILDERS)
    for kind, corpus, size in specs:
        path = frozen_path(kind, corpus, size)
        assert path.is_file(), f"{path.name} missing: run python -m engine.loading.tiny"
        assert len(json.loads(path.read_text())["vocab"]) <= size


def test_two_processes_build_the_same_token_ids():
    code = ("import json, sys\nfrom engine.loading.tiny import tokenizer_specs\n"
            "from engine.loading.tokenizers import TOKENIZER_BUILDERS\n"
            "print(json.dumps([TOKENIZER_BUILDERS[k](c, n)(sys.argv[1]).input_ids for k, c, n in tokenizer_specs()]))")
    runs = [subprocess.run([sys.executable, "-c", code, PROMPT], capture_output=True, text=True, timeout=120,
                           check=True).stdout.strip().splitlines()[-1] for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(len(ids) > 2 for ids in json.loads(runs[0]))
