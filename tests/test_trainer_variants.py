"""Named preset trainers bring their network shape; budget trainers take their budget from the environment."""

import pytest
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_equiflex.network import DEFAULT_PRESET, preset_kwargs
from nnunet_equiflex.planning import NETWORK_CLASS_NAME
from nnunet_equiflex.trainers import baseline_trainers, equiflex_trainers


def plans_naming(preset: str) -> PlansManager:
    """Minimal plans whose 2d configuration names EquiFlexFormer with ``preset``'s kwargs."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in preset_kwargs(preset).items()}
    architecture = {"network_class_name": NETWORK_CLASS_NAME, "arch_kwargs": kwargs, "_kw_requires_import": []}
    return PlansManager({"configurations": {"2d": {"patch_size": [64, 64], "architecture": architecture}}})


@pytest.mark.parametrize(
    "trainer,preset",
    [
        ("EquiFlexTrainerViTS8", "vit_s8"),
        ("EquiFlexTrainerFlip0", "vit_s8_flip0"),
        ("EquiFlexTrainerFlip2", "vit_s8_flip2"),
        ("EquiFlexTrainerFlip4", "vit_s8_flip4"),
        ("EquiFlexTrainerViTTi8", "vit_ti8"),
        ("EquiFlexTrainerTiny", "tiny"),
    ],
)
def test_named_trainers_build_their_preset_over_plans_of_another(trainer, preset):
    manager = plans_naming("tiny" if preset != "tiny" else "vit_s8")
    cls = getattr(equiflex_trainers, trainer)
    net = cls.build_network_architecture(manager, manager.get_configuration("2d"), 1, 3, False)
    expected = preset_kwargs(preset)
    enc = net.encoder
    assert (enc.embed_dim, len(enc.blocks), enc.patch_size) == (
        expected["embed_dim"],
        expected["depth"],
        expected["patch_size"],
    )
    assert (enc.n_lifted_blocks, enc.group_pooling) == (expected["n_lifted_blocks"], expected["group_pooling"])
    assert enc.n_global_blocks == expected.get("n_global_blocks", expected["n_lifted_blocks"])


def test_default_trainer_follows_the_plans_and_flex_trainer_is_its_ablation():
    manager = plans_naming("vit_ti8")
    config = manager.get_configuration("2d")
    net = equiflex_trainers.EquiFlexTrainer.build_network_architecture(manager, config, 1, 3, False)
    assert net.encoder.embed_dim == 192  # the plans' network wins for the default trainer
    assert equiflex_trainers.EquiFlexTrainer.network_preset == DEFAULT_PRESET
    ablation = equiflex_trainers.FlexTrainerFlip0.build_network_architecture(manager, config, 1, 3, False)
    assert ablation.encoder.group == "none" and ablation.encoder.embed_dim == 384
    assert ablation.encoder.n_global_blocks == 2


def test_budget_trainers_need_a_valid_budget(monkeypatch):
    monkeypatch.setenv("EQUIFLEX_BUDGET", "3,20,2")
    assert baseline_trainers.budget_from_env() == (3, 20, 2)
    for value in ("", "3,20", "3,x,2", "0,20,2"):
        monkeypatch.setenv("EQUIFLEX_BUDGET", value)
        with pytest.raises(RuntimeError, match="EPOCHS,ITERATIONS_PER_EPOCH,VALIDATION_ITERATIONS"):
            baseline_trainers.budget_from_env()
    assert baseline_trainers.EquiFlexTrainerFlip0_budget.__mro__[1] is equiflex_trainers.EquiFlexTrainerFlip0
    assert baseline_trainers.nnUNetTrainer_budget.__name__ == "nnUNetTrainer_budget"
