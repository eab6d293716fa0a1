"""The ``nnunet-equiflex`` console command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from nnunet_equiflex.groups import group_elements
    from nnunet_equiflex.network import EquiFlexFormer

    torch.manual_seed(args.seed)
    x = torch.randn(1, 1, 64, 48)
    print(f"input {tuple(x.shape)}; max |f(g x) - g f(x)| per element of D2 (fp32, eval mode):")
    for group in ("d2", "none"):
        net = EquiFlexFormer.from_preset("tiny", in_channels=1, num_classes=3, group=group).eval()
        with torch.no_grad():
            fx = net(x)
            errors = {g.name: (net(g.apply(x)) - g.apply(fx)).abs().max().item() for g in group_elements("d2")}
        print(f"  group={group:5s} " + "  ".join(f"{k}: {v:.2e}" for k, v in errors.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-equiflex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="forward a tiny network and print its equivariance error")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
