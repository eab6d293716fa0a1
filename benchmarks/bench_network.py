"""EquiFlexFormer (vit_s8, lifting 0/2/4 blocks, group d2 or none) vs nnU-Net's 2D PlainConvUNet.

The CNN is built through nnU-Net's own code path (``get_network_from_plans``) from the
architecture entry that nnU-Net's default planner computes for the patch (its
``get_pool_and_conv_props`` and constants; see ``_common.nnunet_2d_architecture``).

Per network, at the same patch and batch: inference time per patch (EquiFlex: 1 pass; CNN: 1
pass and 4 passes = nnU-Net's 2D test-time mirroring), training-step time (forward + backward +
AdamW step; CPU: EquiFlex local blocks use the sdpa backend since flex has no CPU backward;
CNN with deep supervision as nnU-Net trains it), peak memory, parameters, forward FLOPs.
Every time is printed as a ratio to the CNN measured in the same run.

    python benchmarks/bench_network.py --quick   # 128x128 patch, B=1, fewer repeats
    python benchmarks/bench_network.py           # 256x224 patch, B=2 on CPU (12 on CUDA)
    python benchmarks/bench_network.py --full    # adds the sdpa inference rows and more repeats
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import torch
import torch.nn.functional as F
from _common import (
    allow_many_compiles,
    build_cnn,
    measure_interleaved,
    mib,
    nnunet_2d_architecture,
    pick_device,
    print_header,
    print_table,
)
from torch.utils.flop_counter import FlopCounterMode

from nnunet_equiflex.attention import default_token_layout, dense_mask, generate_local_window_mask
from nnunet_equiflex.network import EquiFlexFormer

IN_CHANNELS, NUM_CLASSES = 1, 4  # ACDC: one MRI channel; background, RV, MLV, LVC

VARIANTS = [
    ("EquiFlex d2, lifted 0", dict(group="d2", n_lifted_blocks=0)),
    ("EquiFlex d2, lifted 2", dict(group="d2", n_lifted_blocks=2)),
    ("EquiFlex d2, lifted 4 (vit_s8)", dict(group="d2", n_lifted_blocks=4)),
    ("Flex (group none, 4 global)", dict(group="none", n_lifted_blocks=4)),
]
D2_REFERENCE = "EquiFlex d2, lifted 4 (vit_s8)"
# --options: the encoder options of the neighbouring designs, against the d2 reference above.
OPTION_VARIANTS = [
    ("vit_s8 d2 + GMR patch embedding [6, 11]", dict(group="d2", n_lifted_blocks=4, patch_embed="gmr")),
    (
        "vit_s8 d2 + alternating dilated windows (x2)",
        dict(group="d2", n_lifted_blocks=4, window_dilation=2, alternate_dilation=True),
    ),
]
SQUARE_OPTION_VARIANTS = [("vit_s8 d4 (8 lifted copies)", dict(group="d4", n_lifted_blocks=4))]


def equiflex(**overrides) -> EquiFlexFormer:
    return EquiFlexFormer.from_preset("vit_s8", IN_CHANNELS, NUM_CLASSES, **overrides)


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def equiflex_useful_flops(model: EquiFlexFormer, x: torch.Tensor) -> tuple[int, int]:
    """(counted, windowed): FlopCounterMode with the sdpa backend counts each local block's attention
    as dense ``S x S`` products (what sdpa computes); ``windowed`` replaces that with the allowed
    (q, k) pairs only (what an ideal block-sparse kernel computes, flex's lower bound)."""
    model.set_attention_backend("sdpa")
    counted = forward_flops(model, x)
    enc = model.encoder
    grid = (x.shape[-2] // enc.patch_size, x.shape[-1] // enc.patch_size)
    seq = enc.num_prefix_tokens + grid[0] * grid[1]
    mask = dense_mask(generate_local_window_mask(*grid, enc.window_radius, num_prefix_tokens=1), seq)
    allowed = int(mask.sum())
    heads = enc.blocks[0].attn.num_heads
    head_dim = enc.embed_dim // heads
    n_local = len(enc.blocks) - enc.n_lifted_blocks
    # two matmuls (QK^T and PV), 2 FLOPs per multiply-add
    saved = n_local * 2 * 2 * x.shape[0] * heads * head_dim * (seq * seq - allowed)
    model.set_attention_backend("auto")
    return counted, counted - saved


def cnn_tta(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nnU-Net 2D mirroring: the identity and the three flips, each un-flipped and averaged."""
    out = model(x)
    for axes in ((3,), (2,), (2, 3)):
        out = out + torch.flip(model(torch.flip(x, axes)), axes)
    return out / 4


def train_step_fn(model, optimizer, x, target, device, deep_supervision: bool):
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
            if deep_supervision:  # nnU-Net's weights 1, 1/2, 1/4 ... (normalised), lowest resolution dropped
                outs = out[:-1] if len(out) > 1 else out
                weights = torch.tensor([1 / 2**i for i in range(len(outs))])
                weights = weights / weights.sum()
                loss = 0
                for w, o in zip(weights, outs):
                    stride = target.shape[-1] // o.shape[-1]
                    loss = loss + w * F.cross_entropy(o.float(), target[:, ::stride, ::stride])
            else:
                loss = F.cross_entropy(out.float(), target)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="128x128 patch, B=1, 2 repeats")
    mode.add_argument("--full", action="store_true", help="more repeats, sdpa inference rows")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--patch", type=int, nargs=2, help="default 256 224 (128 128 with --quick)")
    parser.add_argument("--batch", type=int, help="default 2 on CPU (1 with --quick), 12 on CUDA")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    parser.add_argument(
        "--options", action="store_true", help="add the encoder options (GMR, dilated; d4 when the patch is square)"
    )
    parser.add_argument(
        "--layouts", action="store_true", help="add vit_s8 inference with the other flex token layout (same weights)"
    )
    parser.add_argument(
        "--compile-network", action="store_true", help="add vit_s8 inference with the whole network torch.compile'd"
    )
    args = parser.parse_args()

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    patch = tuple(args.patch or ((128, 128) if args.quick else (256, 224)))
    # 12 = nnU-Net's reference 2D batch size (ExperimentPlanner.UNet_reference_val_corresp_bs_2d)
    batch = args.batch or (12 if cuda else (1 if args.quick else 2))
    repeats = args.repeats or (2 if args.quick else (5 if args.full else 3))

    allow_many_compiles()
    print_header("EquiFlexFormer vs nnU-Net 2D PlainConvUNet", device)
    architecture, fitted = nnunet_2d_architecture(patch)
    if fitted != patch:
        raise SystemExit(f"patch {patch} is not one nnU-Net's planner keeps (it would use {fitted}); pick that")
    kw = architecture["arch_kwargs"]
    print(
        f"patch {patch[0]}x{patch[1]}, batch {batch}, repeats {repeats} (median), in {IN_CHANNELS} ch, "
        f"{NUM_CLASSES} classes, {'bf16 autocast' if cuda else 'fp32'}"
    )
    print(
        f"CNN from nnU-Net's planner topology: {kw['n_stages']} stages, features {list(kw['features_per_stage'])}, "
        f"strides {kw['strides']}"
    )
    print("EquiFlex: preset vit_s8 (patch 8, embed 384, depth 12, heads 6, window radius 2)")
    train_backend = "flex" if cuda else "sdpa (dense bool mask; flex has no CPU backward)"
    layout = default_token_layout(device)
    print(
        f"EquiFlex local blocks: inference backend flex (compiled, token layout {layout}); "
        f"training backend {train_backend}"
    )
    print()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, IN_CHANNELS, *patch, generator=gen).to(device)
    target = torch.randint(0, NUM_CLASSES, (batch, *patch), generator=gen).to(device)
    x1 = x[:1]

    rows = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    # All networks stay alive so that every measurement is round-robin over the rows (shared machine).
    cnn = build_cnn(architecture, IN_CHANNELS, NUM_CLASSES, deep_supervision=False).to(device).eval()
    cnn_flops = forward_flops(cnn, x1)
    cnn_params = sum(p.numel() for p in cnn.parameters())
    stats = {
        "CNN, 1 pass": (cnn_params, cnn_flops, cnn_flops),
        "CNN, 4 passes (mirroring TTA)": (cnn_params, 4 * cnn_flops, 4 * cnn_flops),
    }
    infer_calls = {
        "CNN, 1 pass": functools.partial(cnn, x),
        "CNN, 4 passes (mirroring TTA)": functools.partial(cnn_tta, cnn, x),
    }
    train_calls = {}
    if not args.no_train:
        cnn_ds = build_cnn(architecture, IN_CHANNELS, NUM_CLASSES, deep_supervision=True).to(device).train()
        opt = torch.optim.AdamW(cnn_ds.parameters(), lr=1e-4)
        train_calls["CNN, 1 pass"] = train_step_fn(cnn_ds, opt, x, target, device, True)
    variants = list(VARIANTS)
    if args.options:
        variants += OPTION_VARIANTS + (SQUARE_OPTION_VARIANTS if patch[0] == patch[1] else [])
    for name, overrides in variants:
        model = equiflex(**overrides).to(device).eval()
        counted, windowed = equiflex_useful_flops(model, x1)
        stats[name] = (sum(p.numel() for p in model.parameters()), counted, windowed)
        infer_calls[name] = functools.partial(model, x)
        if args.full and name == D2_REFERENCE:
            sdpa_model = equiflex(**overrides, attention_backend="sdpa").to(device).eval()
            sdpa_model.load_state_dict(model.state_dict())
            stats[name + ", sdpa backend"] = stats[name]
            infer_calls[name + ", sdpa backend"] = functools.partial(sdpa_model, x)
        if args.layouts and name == D2_REFERENCE:
            other = "row" if layout != "row" else "tile4"
            other_model = equiflex(**overrides, flex_token_layout=other).to(device).eval()
            other_model.load_state_dict(model.state_dict())
            stats[f"{name}, flex layout {other}"] = stats[name]
            infer_calls[f"{name}, flex layout {other}"] = functools.partial(other_model, x)
        if args.compile_network and name == D2_REFERENCE:
            stats[name + ", whole network compiled"] = stats[name]
            infer_calls[name + ", whole network compiled"] = functools.partial(torch.compile(model, dynamic=False), x)
        if not args.no_train:
            trainee = equiflex(**overrides, attention_backend="flex" if cuda else "sdpa").to(device).train()
            opt = torch.optim.AdamW(trainee.parameters(), lr=1e-4)
            train_calls[name] = train_step_fn(trainee, opt, x, target, device, False)
    print("measuring inference (round-robin) ...", flush=True)
    with torch.no_grad(), autocast:
        timings = measure_interleaved(infer_calls, device, repeats)
    results = {name: (*stats[name], timings[name]) for name in infer_calls}
    train = {}
    if train_calls:
        print("measuring training steps (round-robin) ...", flush=True)
        train = measure_interleaved(train_calls, device, repeats)
    print()

    base_infer = results["CNN, 1 pass"][3].median_s
    base_tta = results["CNN, 4 passes (mirroring TTA)"][3].median_s
    base_flops = results["CNN, 1 pass"][1]
    d2_flops, d2_time = results[D2_REFERENCE][2], results[D2_REFERENCE][3].median_s
    for name, (params, counted, windowed, timing) in results.items():
        versus_d2 = "-" if name.startswith("CNN") else f"{windowed / d2_flops:.2f}x / {timing.median_s / d2_time:.2f}x"
        per_patch_ms = timing.median_s / batch * 1e3
        rows.append(
            [
                name,
                f"{params / 1e6:.1f}",
                f"{counted / 1e9:.1f}",
                f"{windowed / 1e9:.1f}",
                f"{windowed / base_flops:.2f}x",
                f"{per_patch_ms:.0f}",
                f"{timing.median_s / base_infer:.2f}x",
                f"{base_tta / timing.median_s:.2f}x",
                f"{timing.spread:.0%}",
                mib(timing.peak_bytes),
                versus_d2,
            ]
        )
    print("## Inference (no grad), per patch")
    print_table(
        [
            "network",
            "params M",
            "GFLOPs counted",
            "GFLOPs windowed",
            "FLOPs vs CNN 1 pass",
            "ms / patch",
            "time vs CNN 1 pass",
            "speed-up vs CNN+TTA",
            "spread",
            "peak mem",
            "FLOPs / time vs d2 vit_s8",
        ],
        rows,
    )
    print(
        "GFLOPs: forward, one image, FlopCounterMode. 'counted' runs EquiFlex with the sdpa backend, so each local "
        "block's attention is counted as dense S x S (flex attention itself is not seen by FlopCounterMode); "
        "'windowed' replaces that with the allowed (q, k) pairs only (analytic, the block-sparse lower bound). "
        "TTA rows: 4x the 1-pass FLOPs."
    )
    print()
    if train:
        base_train = train["CNN, 1 pass"].median_s
        print("## Training step (forward + backward + AdamW), per batch")
        print_table(
            ["network", "ms / step", "time vs CNN", "spread", "peak mem"],
            [
                [
                    n.replace(", 1 pass", " (deep supervision)"),
                    f"{t.median_s * 1e3:.0f}",
                    f"{t.median_s / base_train:.2f}x",
                    f"{t.spread:.0%}",
                    mib(t.peak_bytes),
                ]
                for n, t in train.items()
            ],
        )
    n4 = results["EquiFlex d2, lifted 4 (vit_s8)"][3].median_s
    print(
        f"EquiFlex vit_s8 (lifted 4) single pass vs CNN with TTA: {base_tta / n4:.2f}x faster per patch "
        f"(network only; see bench_inference.py for whole cases)"
    )


if __name__ == "__main__":
    main()
