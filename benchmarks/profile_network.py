"""Where one EquiFlexFormer inference pass spends its time (torch.profiler, self CPU/CUDA time).

Groups the profiled aten ops into linear layers, global attention (SDPA), local attention
(compiled region of the window or flex backend), GELU, copies/reshapes and the rest, and prints
each group's share.

    python benchmarks/profile_network.py                      # vit_s8, 256x224, B=1
    python benchmarks/profile_network.py --patch 512 512 --preset vit_s8_flip0
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch
from _common import pick_device, print_header, print_table
from torch.profiler import ProfilerActivity, profile

from nnunet_equiflex.network import EquiFlexFormer

GROUPS = [
    ("linear layers (addmm/mm)", ("aten::addmm", "aten::mm", "aten::linear")),
    ("global attention (SDPA)", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    (
        "local attention (compiled window or flex)",
        ("CompiledFxGraph", "Torch-Compiled Region", "flex_attention", "triton"),
    ),
    ("GELU", ("aten::gelu",)),
    ("copies and reshapes", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::index", "aten::cat")),
    ("layer norm", ("layer_norm",)),
]


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(key in name for key in keys):
            return group
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--patch", type=int, nargs=2, default=[256, 224])
    parser.add_argument("--preset", default="vit_s8", help="network preset (default vit_s8)")
    args = parser.parse_args()
    os.environ["EQUIFLEX_WINDOW_COMPILE"] = "1"  # profile the path users run (the window backend compiled)
    device = pick_device(args.device)
    print_header("Where an EquiFlexFormer pass spends its time", device)
    net = EquiFlexFormer.from_preset(args.preset, in_channels=1, num_classes=4)
    net = net.to(device).eval()
    x = torch.randn(1, 1, *args.patch, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        for _ in range(2):  # compile and warm up
            net(x)
        with profile(activities=activities) as prof:
            net(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[group_of(event.key)] += getattr(event, attr)
    whole = sum(totals.values())
    print(f"{args.preset}, patch {args.patch[0]}x{args.patch[1]}, B=1, one pass: {whole / 1e3:.0f} ms")
    print_table(
        ["group", "ms", "share"],
        [[g, f"{t / 1e3:.1f}", f"{t / whole:.0%}"] for g, t in sorted(totals.items(), key=lambda kv: -kv[1])],
    )


if __name__ == "__main__":
    main()
