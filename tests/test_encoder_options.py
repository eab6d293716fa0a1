"""Encoder options from the neighbouring equivariant ViTs: D4 lifting, GMR patch embedding,
alternating dilated windows; their equivariance, their errors and their nnU-Net trainers."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import max_equivariance_error, tiny_network
from nnunet_equiflex.gmr import GMRPatchEmbed
from nnunet_equiflex.groups import group_elements
from nnunet_equiflex.network import EquiFlexFormer, preset_kwargs

BOUND = 1e-4
GMR = dict(patch_embed="gmr")
ALTERNATING = dict(window_dilation=2, alternate_dilation=True)
NEW_SMOKE_TRAINERS = ["EquiFlexTrainerD4Tiny_smoke", "EquiFlexTrainerGMRTiny_smoke", "EquiFlexTrainerDilatedTiny_smoke"]


@pytest.mark.parametrize("options", [GMR, ALTERNATING, {**GMR, **ALTERNATING}], ids=["gmr", "alternating", "both"])
def test_d4_equivariant_with_options(options):
    net = tiny_network(group="d4", refine=True, n_lifted_blocks=2, attention_backend="sdpa", **options)
    x = torch.randn(2, 2, 40, 40)
    errors = max_equivariance_error(net, x, group_elements("d4"))
    assert len(errors) == 8
    assert max(errors.values()) < BOUND, errors


@pytest.mark.parametrize("options", [dict(window_dilation=3), ALTERNATING, {**GMR, **ALTERNATING}])
def test_d2_equivariant_with_dilated_windows(options):
    net = tiny_network(group="d2", refine=True, attention_backend="sdpa", **options)
    x = torch.randn(1, 2, 48, 40)  # a 12 x 10 token grid: rectangular, even and odd window overlaps
    errors = max_equivariance_error(net, x, group_elements("d2"))
    assert max(errors.values()) < BOUND, errors


def test_alternating_dilation_schedule():
    encoder = EquiFlexFormer.from_preset("tiny", 1, 2, n_lifted_blocks=0, **ALTERNATING).encoder
    assert encoder.local_dilations() == [1, 2, 1, 2]  # even local blocks dense, odd dilated
    assert EquiFlexFormer.from_preset("tiny", 1, 2, window_dilation=2).encoder.local_dilations() == [2, 2, 2]


@pytest.mark.parametrize(
    "patch_size,kernel_sizes,strides",
    [(8, (6, 11), None), (4, (6, 11), None), (4, (6, 6), (2, 2)), (4, (5, 3, 4), (1, 1, 4)), (4, (4,), None)],
)
def test_gmr_embedding_gives_the_token_grid_and_commutes_with_d4(patch_size, kernel_sizes, strides):
    """Every centring case (even/odd kernels, strides 1, 2 and p) lands on the H/p x W/p token centres
    (a mis-centred layer gives errors of the size of the tokens, about 1, not rounding)."""
    embed = GMRPatchEmbed(2, 16, patch_size, kernel_sizes, hidden_dim=8, strides=strides).eval()
    rect = torch.randn(1, 2, 5 * patch_size, 3 * patch_size)
    with torch.no_grad():
        tokens = embed(rect)
        assert tokens.shape == (1, 15, 16)
        for g in group_elements("d2"):
            assert (embed(g.apply(rect)) - g.apply_to_tokens(tokens, (5, 3))).abs().max() < BOUND, g.name
        square = torch.randn(1, 2, 4 * patch_size, 4 * patch_size)
        tokens = embed(square)
        for g in group_elements("d4"):
            assert (embed(g.apply(square)) - g.apply_to_tokens(tokens, (4, 4))).abs().max() < BOUND, g.name


def _rotation_cosine(patch_embed: str) -> float:
    """Mean per-token cosine between the tokens of x and the back-rotated tokens of rot90(x)."""
    net = EquiFlexFormer.from_preset("tiny", 3, 2, group="none", n_lifted_blocks=0, patch_embed=patch_embed).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tokens = net.encoder.patch_embed(x).reshape(4, 8, 8, -1)
        rotated = net.encoder.patch_embed(torch.rot90(x, 1, dims=(-2, -1))).reshape(4, 8, 8, -1)
    back = torch.rot90(rotated, -1, dims=(1, 2))
    return F.cosine_similarity(tokens, back, dim=-1).mean().item()


def test_gmr_tokens_follow_rotations_and_linear_tokens_do_not():
    """Equi-ViT's token check, without any lifting (group "none").

    GMR kernels are exactly radially symmetric on the pixel grid and centred on the token grid,
    so rotating the image rotates the token grid: the cosine is 1 up to float rounding (1e-6),
    hence > 0.999. A random p x p linear kernel sees a rotated patch through an unrelated
    kernel: for i.i.d. pixels the two token vectors are uncorrelated apart from the small
    shared bias, so the mean cosine sits near 0 (about 0.01 here); 0.5 is far from both.
    """
    gmr, linear = _rotation_cosine("gmr"), _rotation_cosine("linear")
    assert gmr > 0.999, gmr
    assert linear < 0.5, linear


def test_gmr_and_alternation_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"cannot be centred on the token grid.*use kernel size 12 or 10"):
        GMRPatchEmbed(1, 8, 8, kernel_sizes=(6, 11), strides=(2, 4))
    with pytest.raises(ValueError, match="multiply to the token size 8"):
        GMRPatchEmbed(1, 8, 8, kernel_sizes=(6, 11), strides=(2, 2))
    with pytest.raises(ValueError, match="unknown patch_embed 'convnext'; choose one of linear, gmr, conv"):
        tiny_network(patch_embed="convnext")
    with pytest.raises(ValueError, match="needs window_dilation >= 2"):
        tiny_network(alternate_dilation=True)


def test_d4_gmr_rejects_rectangles():
    with pytest.raises(ValueError, match="needs a square input, got 32x24"):
        tiny_network(group="d4", **GMR)(torch.randn(1, 2, 32, 24))


def test_square_patch_size_keeps_the_area():
    from nnunet_equiflex.planners.equiflex_planner import square_patch_size

    assert square_patch_size((48, 40), 4) == (44, 44)
    assert square_patch_size((512, 128), 8) == (256, 256)
    assert square_patch_size((224, 224), 8) == (224, 224)
    assert square_patch_size((8, 2), 8) == (8, 8)


def _plans(patch_size: list[int], group: str = "d2") -> dict:
    arch = {"network_class_name": "nnunet_equiflex.network.EquiFlexFormer", "arch_kwargs": preset_kwargs("tiny")}
    arch["arch_kwargs"]["group"] = group
    return {"plans_name": "EquiFlexPlans", "configurations": {"2d": {"patch_size": patch_size, "architecture": arch}}}


def test_d4_trainer_rejects_rectangular_patch_before_setup():
    from nnunet_equiflex.trainers.equiflex_trainers import (
        EquiFlexTrainerD4,
        EquiFlexTrainerD4Tiny_smoke,
        EquiFlexTrainerGMR,
        check_patch_fits_group,
    )

    for trainer in (EquiFlexTrainerD4, EquiFlexTrainerD4Tiny_smoke):
        with pytest.raises(ValueError, match=r"needs a square patch.*patch size \(48, 40\).*network_overrides"):
            trainer(_plans([48, 40]), "2d", 0, {}, torch.device("cpu"))
    check_patch_fits_group(EquiFlexTrainerD4Tiny_smoke, _plans([46, 48]), "2d")  # 48x48 after the token fit
    check_patch_fits_group(EquiFlexTrainerGMR, _plans([48, 40]), "2d")  # d2 takes rectangles
    with pytest.raises(ValueError, match="EquiFlexTrainerGMR uses group 'd4'"):  # the group comes from the plans
        EquiFlexTrainerGMR(_plans([48, 40], group="d4"), "2d", 0, {}, torch.device("cpu"))


@pytest.mark.slow
def test_planner_makes_d4_patches_square(trained_toy):
    from nnunet_env import run

    # nnU-Net's own planner is forced to a rectangle, so the squaring is what is tested.
    script = (
        "from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner\n"
        "base = ExperimentPlanner.get_plans_for_configuration\n"
        "def rectangular(self, *args, **kwargs):\n"
        "    plan = base(self, *args, **kwargs)\n"
        "    if len(plan['patch_size']) == 2:\n"
        "        plan['patch_size'] = (48, 40)\n"
        "    return plan\n"
        "ExperimentPlanner.get_plans_for_configuration = rectangular\n"
        "from nnunet_equiflex.planners.equiflex_planner import plan_dataset\n"
        "plan_dataset(901, preset='tiny', plans_name='EquiFlexPlansD4', network_overrides={'group': 'd4'})\n"
    )
    run(["python", "-c", script], trained_toy["env"], trained_toy["logs"] / "plan_d4.txt")
    plans_file = trained_toy["root"] / "preprocessed" / trained_toy["raw"].name / "EquiFlexPlansD4.json"
    cfg = json.loads(plans_file.read_text())["configurations"]["2d"]
    assert cfg["patch_size"] == [44, 44]
    assert cfg["architecture"]["arch_kwargs"]["group"] == "d4"


@pytest.mark.slow
@pytest.mark.parametrize("trainer", NEW_SMOKE_TRAINERS)
def test_new_variants_train_through_nnunet(trained_toy, trainer):
    from nnunet_env import run

    run(
        ["nnUNetv2_train", "901", "2d", "0", "-tr", trainer, "-p", "EquiFlexPlans", "-device", "cpu"],
        trained_toy["env"],
        trained_toy["logs"] / f"train_{trainer}.txt",
    )
    fold = trained_toy["model_dir"].parent / f"{trainer}__EquiFlexPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "validation" / "summary.json").is_file()
