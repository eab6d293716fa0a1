"""Scale-out through nnU-Net's own engines: PyTorch DDP (gloo on CPU) and -num_parts/-part_id."""

import filecmp
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nnunet_env import run
from nnunet_equiflex.network import EquiFlexFormer

KWARGS = dict(group="d2", n_lifted_blocks=1, refine=True, attention_backend="sdpa", drop_path_rate=0.0)


def _batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 1, 32, 24, generator=generator)
    labels = torch.randint(0, 3, (4, 32, 24), generator=generator)
    return images, labels


def _step(net, images, labels):
    loss = F.cross_entropy(net(images), labels)
    loss.backward()
    return loss


def _ddp_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    net = EquiFlexFormer.from_preset("tiny", 1, 3, **KWARGS)
    ddp = torch.nn.parallel.DistributedDataParallel(net)  # no find_unused_parameters: every parameter is used
    images, labels = _batch()
    share = images.shape[0] // world_size
    mine = slice(rank * share, (rank + 1) * share)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(2):  # a second step makes DDP complain if a parameter got no gradient in the first
        optimizer.zero_grad()
        _step(ddp, images[mine], labels[mine])
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        optimizer.step()
    if rank == 0:
        torch.save(grads, out_file)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_on_the_whole_batch(tmp_path):
    out_file = tmp_path / "ddp_grads.pt"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, start_method="spawn")
    ddp_grads = torch.load(out_file)

    torch.manual_seed(0)
    net = EquiFlexFormer.from_preset("tiny", 1, 3, **KWARGS)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    images, labels = _batch()
    for _ in range(2):
        optimizer.zero_grad()
        _step(net, images, labels)
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        optimizer.step()
    assert grads.keys() == ddp_grads.keys()
    worst = max((grads[n] - ddp_grads[n]).abs().max().item() for n in grads)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_split_inference_equals_a_single_run(trained_toy):
    """nnUNetv2_predict -num_parts 2 -part_id 0/1 writes exactly the files of one run."""
    base = [
        "nnUNetv2_predict",
        "-i",
        str(trained_toy["raw"] / "imagesTs"),
        "-d",
        "901",
        "-c",
        "2d",
        "-tr",
        trained_toy["trainer"],
        "-p",
        "EquiFlexPlans",
        "-f",
        "0",
        "-device",
        "cpu",
    ]
    split = trained_toy["root"] / "predictions_split"
    for part in ("0", "1"):
        run([*base, "-o", str(split), "-num_parts", "2", "-part_id", part], trained_toy["env"])
    single = trained_toy["predictions"]
    cases = sorted(p.name for p in single.glob("*.nii.gz"))
    assert cases and sorted(p.name for p in split.glob("*.nii.gz")) == cases
    for name in cases:
        assert filecmp.cmp(single / name, split / name, shallow=False), name
    assert os.path.isfile(split / "plans.json") and os.path.isfile(split / "dataset.json")
