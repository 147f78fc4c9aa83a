import os
import tempfile

# Tests never touch the network, and never the user's cache: set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ENGINE_CACHE_DIR", tempfile.mkdtemp(prefix="engine-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this once, when it is first imported (torch.compile may import it long before the kernel tests run):
# set for the whole session so engine/kernels run in the interpreter whatever test imports Triton first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def images_close(a, b, *, levels: int = 1, fraction: float = 0.999) -> tuple[bool, float]:
    """uint8 images equal within `levels` on at least `fraction` of values."""
    xa = np.stack([np.asarray(i, dtype=np.int16) for i in a])
    xb = np.stack([np.asarray(i, dtype=np.int16) for i in b])
    if xa.shape != xb.shape:
        return False, 0.0
    ok = float((np.abs(xa - xb) <= levels).mean())
    return ok >= fraction, ok


@pytest.fixture(scope="session")
def engine():
    from engine import Engine

    return Engine(device="cpu")
