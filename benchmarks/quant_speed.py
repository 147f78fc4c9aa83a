"""The quant pass's int8 paths against bf16 and fp32 on the CPU: one UNet forward (a CFG batch of 2) of small-sdxl
(SDXL's block structure at reduced widths), eager. The measurement behind `choose_quant`'s "auto" on the CPU
(engine/compiler/plan.py) and the quant pass's docstring. The int8 rows are what the pass makes of the bf16 UNet
(torchao `Int8WeightOnlyConfig` / `Int8DynamicActivationInt8WeightConfig` on the same Linear layers,
`engine.compiler.quant`); the details column gives each output's relative L2 error against fp32.

    python benchmarks/quant_speed.py [--model small-sdxl] [--size 512] [--runs 5] [--threads N]
                                     [--out benchmarks/results/quant_cpu]
"""

import argparse
import copy
import sys

import torch

from engine.bench.measurement import Measurements, script_command


def build_variants(model: str) -> dict[str, torch.nn.Module]:
    from torchao.quantization import quantize_

    from engine.compiler.quant import _is_linear, _torchao_config
    from engine.loading import load_model

    unet = load_model(model, torch_dtype=torch.float32).components["unet"].eval()
    bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    variants = {"fp32": unet, "bf16": bf16}
    for kind in ("int8_weight_only", "int8_dynamic"):
        quantized = copy.deepcopy(bf16)
        quantize_(quantized, _torchao_config(kind), filter_fn=_is_linear)
        variants[f"bf16 + {kind} (quant pass)"] = quantized
    return variants


def unet_inputs(unet: torch.nn.Module, size: int, dtype: torch.dtype) -> dict[str, object]:
    c = unet.config
    g = torch.Generator().manual_seed(0)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    side = size // 8
    return {"sample": torch.randn(2, c.in_channels, side, side, generator=g).to(dtype),
            "timestep": torch.tensor(500.0),
            "encoder_hidden_states": torch.randn(2, 77, c.cross_attention_dim, generator=g).to(dtype),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g).to(dtype),
                                  "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2).to(dtype)}}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small-sdxl")
    parser.add_argument("--size", type=int, default=512, help="image size; the UNet sees size/8 latents")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", default="benchmarks/results/quant_cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = Measurements(f"int8 (quant pass) vs bf16 vs fp32: one {args.model} UNet forward on the CPU",
                     script_command(sys.argv[1:]), runs=args.runs)
    variants = build_variants(args.model)
    calls = {}
    for name, unet in variants.items():
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        inputs = unet_inputs(variants["fp32"], args.size, dtype)
        calls[name] = (lambda u=unet, i=inputs: u(**i, return_dict=False)[0])
    with torch.no_grad():
        outputs = {name: call() for name, call in calls.items()}  # warm-up (oneDNN primitives, torchao dispatch)
        for name, out in outputs.items():
            m.get(name).extra["relative L2 error vs fp32"] = f"{relative_error(out, outputs['fp32']):.2e}"
        for _ in range(args.runs):  # round-robin: background load falls on every row
            for name, call in calls.items():
                m.time(name, call)
    m.ratio("fp32 / bf16", "fp32", "bf16")
    for kind in ("int8_weight_only", "int8_dynamic"):
        m.ratio(f"{kind} / bf16", f"bf16 + {kind} (quant pass)", "bf16")
    env = m.environment
    m.notes += [f"{args.model} UNet ({sum(p.numel() for p in variants['fp32'].parameters()) / 1e6:.1f} M params), "
                f"{args.size}x{args.size} image ({args.size // 8}x{args.size // 8} latents), batch 2 (CFG), eager: "
                "no torch.compile (O3 would compile after quantizing; not measured here)",
                f"native bf16: {'yes' if env.get('native_bf16') else 'no'} ({env.get('native_bf16_detail')})"]
    m.write(args.out)
