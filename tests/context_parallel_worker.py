"""One rank of tests/test_context_parallel.py, started by torchrun: tiny-flux with `parallel` forced to a context kind
over the gloo group. Rank 0 writes to argv[2]: the image (image.npy), the transformer's output on `transformer_inputs`
(transformer.npy), the image of a ControlNet request (controlnet.npy) and the parallel pass's report (report.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

KW = dict(prompt="a lighthouse at dusk", width=64, height=64, num_inference_steps=2, seed=7)


def controlnet_request() -> dict:
    from PIL import Image

    pixels = (np.arange(64 * 64 * 3).reshape(64, 64, 3) * 37 % 251).astype(np.uint8)
    return dict(KW, controlnets=[{"model": "tiny-controlnet-flux", "image": Image.fromarray(pixels)}])


def transformer_inputs() -> dict:
    """tiny-flux shapes: 64 packed image tokens (an 8x8 grid), 8 text tokens; both split evenly over 2 ranks."""
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(64, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8
    return dict(hidden_states=torch.randn(1, 64, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), img_ids=img_ids,
                txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)


def main(mode: str, out: Path, opt_level: str) -> None:
    torch.set_num_threads(1)  # two ranks on a shared CPU
    from engine import Engine
    from engine.loading.tiny import ensure_tiny_model
    from engine.scaleout.parallel import join_process_group

    rank = join_process_group("cpu")
    extra = {"dtype": "fp32"} if opt_level != "O0" else {}
    engine = Engine(device=rank.device, opt_level=opt_level, compile_config={"parallel": mode, **extra})
    with rank.rank_zero_first():
        loaded = engine.load("tiny-flux")
        ensure_tiny_model("controlnet-flux")
    result = engine.generate(model="tiny-flux", **KW)
    controlled = engine.generate(model="tiny-flux", **controlnet_request())
    with torch.no_grad():
        direct = loaded.components["transformer"](**transformer_inputs())[0]
    report = engine.optimization_report("tiny-flux")
    if rank.writes_output:
        np.save(out / "image.npy", np.stack([np.asarray(i) for i in result.images]))
        np.save(out / "transformer.npy", direct.float().numpy())
        np.save(out / "controlnet.npy", np.stack([np.asarray(i) for i in controlled.images]))
        (out / "report.json").write_text(json.dumps({"status": report.status("parallel"),
                                                     "details": report.details("parallel"),
                                                     "world_size": rank.world_size}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
