"""EquiFlexFormer presets vs nnU-Net's PlainConvUNet (2D, or 3D with a 3-axis --patch), per patch: inference,
training step, FLOPs.

The CNN is built through nnU-Net's own code path (``get_network_from_plans``) from the
architecture entry that nnU-Net's default planner computes for the patch (its
``get_pool_and_conv_props`` and constants; see ``_common.nnunet_architecture``).

Per network, at the same patch and batch: inference time per patch (EquiFlex: 1 pass; CNN: 1
pass and 4 passes in 2D, 8 in 3D = nnU-Net's test-time mirroring), training-step time (forward + backward +
AdamW step; the CNN with deep supervision as nnU-Net trains it; every EquiFlex preset with its
local blocks on two backends: on CPU the dense-masked sdpa ("before": the first release's CPU
training path) and the linear-cost window backend ("after": today's CPU default); on CUDA flex
and window), peak memory, parameters and forward FLOPs. EquiFlex FLOPs are analytic
(``nnunet_equiflex.flops``; FlopCounterMode does not see its attention), the CNN's are
FlopCounterMode's. Every time is printed as a ratio to the CNN measured in the same run.

    python benchmarks/bench_network.py --quick   # 128x128 patch, B=1, fewer repeats
    python benchmarks/bench_network.py           # 256x224 patch, B=2 on CPU (12 on CUDA)
    python benchmarks/bench_network.py --full    # more repeats, sdpa inference rows
    python benchmarks/bench_network.py --patch 64 128 128 --batch 1   # 3D: the 3D presets vs 3d_fullres's CNN
    python benchmarks/bench_network.py --quick3d # 3D at 32x64x64, B=1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools

import torch
import torch.nn.functional as F
from _common import (
    allow_many_compiles,
    build_cnn,
    measure_interleaved,
    mib,
    nnunet_architecture,
    pick_device,
    print_header,
    print_table,
)
from torch.utils.flop_counter import FlopCounterMode

from nnunet_equiflex.flops import network_forward_flops
from nnunet_equiflex.network import DEFAULT_PRESET_3D, EquiFlexFormer

IN_CHANNELS, NUM_CLASSES = 1, 4  # ACDC: one MRI channel; background, RV, MLV, LVC

# (row name, preset, overrides)
VARIANTS = [
    ("vit_s8 (4 lifted, 4 global, max)", "vit_s8", {}),
    ("vit_s8_flip4 (4 lifted, 2 global, max)", "vit_s8_flip4", {}),
    ("vit_s8_flip2 (2 lifted, 2 global, max)", "vit_s8_flip2", {}),
    ("vit_s8_flip0 (embedding lifted, mean, folded)", "vit_s8_flip0", {}),
    ("vit_ti8 (192 wide, flip0 lifting)", "vit_ti8", {}),
    ("tiny (64 wide, token 4)", "tiny", {}),
    ("ViT-S/8 group none (2 global, no lifting)", "vit_s8_flip0", {"group": "none"}),
]
D2_REFERENCE = VARIANTS[0][0]
# --options: the encoder options of the neighbouring designs, against the vit_s8 reference above.
OPTION_VARIANTS = [
    ("vit_s8 + GMR patch embedding [6, 11]", "vit_s8", {"patch_embed": "gmr"}),
    ("vit_s8 + alternating dilated windows (x2)", "vit_s8", {"window_dilation": 2, "alternate_dilation": True}),
]
SQUARE_OPTION_VARIANTS = [("vit_s8 d4 (8 lifted copies)", "vit_s8", {"group": "d4"})]
VARIANTS_3D = [
    ("vit_s8_3d (embedding lifted over 8 flips, mean, folded)", "vit_s8_3d", {}),
    ("vit_ti8_3d (192 wide, flip0 lifting)", "vit_ti8_3d", {}),
    ("tiny3d (32 wide, token 4, 1 lifted block)", "tiny3d", {}),
    ("ViT-S/8 3D group none (2 global, no lifting)", "vit_s8_3d", {"group": "none"}),
]
CNN_1 = "CNN, 1 pass"


def cnn_tta_name(dims: int) -> str:
    return f"CNN, {2**dims} passes (mirroring TTA)"


def flip_sets(dims: int) -> list[tuple[int, ...]]:
    """The spatial axes of every non-identity flip of a (B, C, *spatial) tensor: 3 in 2D, 7 in 3D."""
    axes = range(2, 2 + dims)
    return [c for r in range(1, dims + 1) for c in itertools.combinations(axes, r)]


def cnn_tta(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nnU-Net's mirroring: the identity and every flip of the spatial axes, each un-flipped and averaged."""
    flips = flip_sets(x.ndim - 2)
    out = model(x)
    for axes in flips:
        out = out + torch.flip(model(torch.flip(x, axes)), axes)
    return out / (1 + len(flips))


def counted_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def equiflex_flops(model: EquiFlexFormer, x: torch.Tensor) -> int:
    """Analytic windowed FLOPs; GMR (not covered analytically) falls back to the counter (a lower bound)."""
    try:
        return network_forward_flops(model, tuple(x.shape[2:]))["total"]
    except ValueError:
        return counted_flops(model, x)


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
                    strides = [t // s for t, s in zip(target.shape[1:], o.shape[2:])]
                    loss = loss + w * F.cross_entropy(
                        o.float(), target[(slice(None), *(slice(None, None, k) for k in strides))]
                    )
            else:
                loss = F.cross_entropy(out.float(), target)
        loss.backward()
        optimizer.step()

    return step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="128x128 patch, B=1, 2 repeats")
    mode.add_argument("--full", action="store_true", help="more repeats, sdpa inference rows")
    parser.add_argument("--device", default="auto")
    mode.add_argument("--quick3d", action="store_true", help="3D: 32x64x64 patch, B=1, 2 repeats")
    parser.add_argument(
        "--patch", type=int, nargs="+", help="2 sizes (2D) or 3 (3D); default 256 224 (128 128 with --quick)"
    )
    parser.add_argument("--batch", type=int, help="default 2 on CPU (1 with --quick), 12 on CUDA")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    parser.add_argument("--presets", nargs="*", help="only these row names' presets (default: all rows)")
    parser.add_argument(
        "--options", action="store_true", help="add the encoder options (GMR, dilated; d4 when the patch is square)"
    )
    parser.add_argument(
        "--layouts", action="store_true", help="add vit_s8 inference with the flex backend in both token layouts"
    )
    parser.add_argument(
        "--compile-network", action="store_true", help="add vit_s8 inference with the whole network torch.compile'd"
    )
    return parser.parse_args()


def training_backends(device: torch.device) -> list[tuple[str, str]]:
    """(label, backend) of the training rows: before and after the linear-cost backend."""
    if device.type == "cuda":
        return [("flex", "flex"), ("window", "window")]
    return [("before: sdpa, dense mask", "sdpa"), ("after: window", "window")]


def add_extra_inference_rows(args, name, model, make, x, stats, infer_calls, device) -> None:
    """The --full/--layouts/--compile-network rows, sharing the reference network's weights."""
    extras = {}
    if args.full:
        extras[f"{name}, sdpa backend"] = make(attention_backend="sdpa")
    if args.layouts:
        for layout in ("row", "tile4"):
            extras[f"{name}, flex layout {layout}"] = make(attention_backend="flex", flex_token_layout=layout)
    for label, other in extras.items():
        other.load_state_dict(model.state_dict())
        stats[label] = stats[name]
        infer_calls[label] = functools.partial(other, x)
    if args.compile_network:
        stats[f"{name}, whole network compiled"] = stats[name]
        infer_calls[f"{name}, whole network compiled"] = functools.partial(torch.compile(model, dynamic=False), x)


def build_rows(args, device, architecture, x, target):
    """Every network of the run, its (params, GFLOPs) and its inference and training callables."""
    cnn = build_cnn(architecture, IN_CHANNELS, NUM_CLASSES, deep_supervision=False).to(device).eval()
    cnn_flops = counted_flops(cnn, x[:1])
    cnn_params = sum(p.numel() for p in cnn.parameters())
    dims = x.ndim - 2
    tta = cnn_tta_name(dims)
    stats = {CNN_1: (cnn_params, cnn_flops), tta: (cnn_params, 2**dims * cnn_flops)}
    infer_calls = {CNN_1: functools.partial(cnn, x), tta: functools.partial(cnn_tta, cnn, x)}
    train_calls = {}
    if not args.no_train:
        cnn_ds = build_cnn(architecture, IN_CHANNELS, NUM_CLASSES, deep_supervision=True).to(device).train()
        train_calls["CNN (deep supervision)"] = train_step_fn(
            cnn_ds, torch.optim.AdamW(cnn_ds.parameters(), lr=1e-4), x, target, device, True
        )
    variants = [v for v in (VARIANTS if dims == 2 else VARIANTS_3D) if not args.presets or v[1] in args.presets]
    if args.options and dims == 2:
        variants += OPTION_VARIANTS + (SQUARE_OPTION_VARIANTS if x.shape[-2] == x.shape[-1] else [])
    for name, preset, overrides in variants:

        def make(preset=preset, overrides=overrides, **more):
            return EquiFlexFormer.from_preset(preset, IN_CHANNELS, NUM_CLASSES, **overrides, **more).to(device)

        model = make().eval()
        stats[name] = (sum(p.numel() for p in model.parameters()), equiflex_flops(model, x[:1]))
        infer_calls[name] = functools.partial(model, x)
        if name == D2_REFERENCE:
            add_extra_inference_rows(args, name, model, make, x, stats, infer_calls, device)
        if not args.no_train:
            for label, backend in training_backends(device):
                trainee = make(attention_backend=backend).train()
                opt = torch.optim.AdamW(trainee.parameters(), lr=1e-4)
                train_calls[f"{name}, {label}"] = train_step_fn(trainee, opt, x, target, device, False)
    return stats, infer_calls, train_calls


def print_inference(results, batch, dims: int) -> None:
    passes = 2**dims
    base_infer, base_tta = results[CNN_1][2].median_s, results[cnn_tta_name(dims)][2].median_s
    base_flops = results[CNN_1][1]
    rows = []
    for name, (params, flops, timing) in results.items():
        rows.append(
            [
                name,
                f"{params / 1e6:.2f}",
                f"{flops / 1e9:.2f}",
                f"{flops / base_flops:.2f}x",
                f"{passes * base_flops / flops:.2f}x",
                f"{timing.median_s / batch * 1e3:.0f}",
                f"{timing.median_s / base_infer:.2f}x",
                f"{base_tta / timing.median_s:.2f}x",
                f"{timing.spread:.0%}",
                mib(timing.peak_bytes),
            ]
        )
    print("## Inference (no grad), per patch")
    print_table(
        [
            "network",
            "params M",
            "GFLOPs",
            "FLOPs vs CNN 1 pass",
            "fewer FLOPs than CNN+TTA",
            "ms / patch",
            "time vs CNN 1 pass",
            "speed-up vs CNN+TTA",
            "spread",
            "peak mem",
        ],
        rows,
    )
    print(
        f"GFLOPs: forward, one image. CNN: FlopCounterMode (convolutions); TTA rows {passes}x. EquiFlex: analytic "
        "(nnunet_equiflex.flops: every matmul and convolution, local attention over the window's pairs; the same "
        "counting as FlopCounterMode, checked in tests/test_flops.py), since FlopCounterMode sees neither flex, "
        "the window backend nor CPU SDPA."
    )
    print()


def print_training(train: dict) -> None:
    base = train["CNN (deep supervision)"].median_s
    print("## Training step (forward + backward + AdamW), per batch")
    rows = [
        [n, f"{t.median_s * 1e3:.0f}", f"{t.median_s / base:.2f}x", f"{t.spread:.0%}", mib(t.peak_bytes)]
        for n, t in train.items()
    ]
    print_table(["network", "ms / step", "time vs CNN", "spread", "peak mem"], rows)
    pairs = {}
    for name, timing in train.items():
        for label in ("before", "after"):
            if f", {label}:" in name:
                pairs.setdefault(name.split(f", {label}:")[0], {})[label] = timing.median_s
    for name, pair in pairs.items():
        if len(pair) == 2:
            ratio = pair["before"] / pair["after"]
            print(f"{name}: training step before/after = {ratio:.2f}x (above 1: after is faster)")
    print()


def run_settings(args, cuda: bool) -> tuple[tuple[int, ...], int, int]:
    """Patch, batch and repeats of the run; the axis count is the patch's."""
    patch = tuple(args.patch or ((32, 64, 64) if args.quick3d else (128, 128) if args.quick else (256, 224)))
    if len(patch) not in (2, 3):
        raise SystemExit(f"--patch takes 2 sizes (2D) or 3 (3D), got {len(patch)}")
    # 12 = nnU-Net's reference 2D batch size (ExperimentPlanner.UNet_reference_val_corresp_bs_2d); 2 in 3D
    batch = args.batch or ((12 if len(patch) == 2 else 2) if cuda else (1 if args.quick or len(patch) == 3 else 2))
    repeats = args.repeats or (2 if args.quick or args.quick3d else (5 if args.full else 3))
    return patch, batch, repeats


def print_3d_target(results: dict) -> None:
    """The issue's 3D FLOPs target for the default 3D preset (the planner's), measured in this run."""
    row = next((name for name, preset, _ in VARIANTS_3D if preset == DEFAULT_PRESET_3D and name in results), None)
    if row is None:
        print(f"Target for the default 3D preset ({DEFAULT_PRESET_3D}): not measured (not among --presets)")
        return
    fewer = results[cnn_tta_name(3)][1] / results[row][1]
    verdict = "MET" if fewer >= 3.0 else "MISSED"
    print(f"Target 'the default 3D preset ({DEFAULT_PRESET_3D}) >= 3x fewer FLOPs per tile than the CNN with TTA': "
          f"{verdict} ({fewer:.1f}x)")  # fmt: skip


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    patch, batch, repeats = run_settings(args, cuda)
    dims = len(patch)

    allow_many_compiles()
    print_header(f"EquiFlexFormer presets vs nnU-Net {dims}D PlainConvUNet", device)
    architecture, fitted = nnunet_architecture(patch)
    if fitted != patch:
        raise SystemExit(f"patch {patch} is not one nnU-Net's planner keeps (it would use {fitted}); pick that")
    kw = architecture["arch_kwargs"]
    print(
        f"patch {'x'.join(map(str, patch))}, batch {batch}, repeats {repeats} (median), in {IN_CHANNELS} ch, "
        f"{NUM_CLASSES} classes, {'bf16 autocast' if cuda else 'fp32'}"
    )
    print(
        f"CNN from nnU-Net's planner topology: {kw['n_stages']} stages, features {list(kw['features_per_stage'])}, "
        f"strides {kw['strides']}"
    )
    print(f"EquiFlex local blocks: inference backend {'flex' if cuda else 'window'} (auto); training rows below")
    print()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, IN_CHANNELS, *patch, generator=gen).to(device)
    target = torch.randint(0, NUM_CLASSES, (batch, *patch), generator=gen).to(device)
    # All networks stay alive so that every measurement is round-robin over the rows (shared machine).
    stats, infer_calls, train_calls = build_rows(args, device, architecture, x, target)
    print("measuring inference (round-robin) ...", flush=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        timings = measure_interleaved(infer_calls, device, repeats)
    results = {name: (*stats[name], timings[name]) for name in infer_calls}
    train = {}
    if train_calls:
        print("measuring training steps (round-robin) ...", flush=True)
        train = measure_interleaved(train_calls, device, repeats)
    print()
    print_inference(results, batch, dims)
    if train:
        print_training(train)
    base_tta = results[cnn_tta_name(dims)][2].median_s
    for name in [v[0] for v in (VARIANTS if dims == 2 else VARIANTS_3D) if v[0] in results]:
        print(f"{name} single pass vs CNN with TTA: {base_tta / results[name][2].median_s:.2f}x faster per patch")
    if dims == 3:
        print_3d_target(results)
    print("(network only; bench_inference.py times whole cases through nnU-Net's predictor)")


if __name__ == "__main__":
    main()
