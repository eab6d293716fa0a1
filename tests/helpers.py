"""Small shared pieces for the tests."""

import torch

from nnunet_equiflex.network import EquiFlexFormer


def tiny_network(in_channels: int = 2, num_classes: int = 3, **overrides) -> EquiFlexFormer:
    """The tiny preset with every parameter random (the refinement's zero init would hide it)."""
    net = EquiFlexFormer.from_preset("tiny", in_channels, num_classes, **overrides)
    with torch.no_grad():
        if net.decoder.refinement is not None:
            torch.nn.init.normal_(net.decoder.refinement.conv2.weight, std=0.2)
    return net.eval()


def max_equivariance_error(net, x, elements) -> dict[str, float]:
    """max |f(g x) - g f(x)| for each element g."""
    with torch.no_grad():
        fx = net(x)
        return {g.name: (net(g.apply(x)) - g.apply(fx)).abs().max().item() for g in elements}
