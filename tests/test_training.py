"""A tiny network learns: it overfits a handful of synthetic images on CPU."""

import torch
import torch.nn.functional as F

from nnunet_equiflex.network import EquiFlexFormer


def synthetic_batch(n: int, size: int = 32, generator=None):
    """Images with a disk (class 1) and a square (class 2) at random places, plus noise."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx, r = torch.randint(8, size - 8, (2,), generator=generator).tolist() + [
            torch.randint(3, 7, (1,), generator=generator).item()
        ]
        label = torch.zeros(size, size, dtype=torch.long)
        sy, sx = torch.randint(2, size - 10, (2,), generator=generator).tolist()
        label[sy : sy + 8, sx : sx + 8] = 2
        label[(ys - cy) ** 2 + (xs - cx) ** 2 <= r * r] = 1
        image = label.float() + 0.3 * torch.randn(size, size, generator=generator)
        images.append(image[None])
        labels.append(label)
    return torch.stack(images), torch.stack(labels)


def foreground_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    dices = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        dices.append((2 * (p & t).sum() / (p.sum() + t.sum()).clamp(min=1)).item())
    return sum(dices) / len(dices)


def test_tiny_network_overfits_to_high_dice():
    generator = torch.Generator().manual_seed(0)
    images, labels = synthetic_batch(6, generator=generator)
    net = EquiFlexFormer.from_preset("tiny", in_channels=1, num_classes=3)
    with torch.no_grad():
        dice_before = foreground_dice(net.eval()(images).argmax(1), labels, 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    net.train()
    for _ in range(300):
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        dice_after = foreground_dice(net.eval()(images).argmax(1), labels, 3)
    assert dice_before < 0.5
    assert dice_after > 0.9, f"Dice {dice_after:.3f} after 300 steps (loss {loss.item():.3f})"
