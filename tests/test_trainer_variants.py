"""Named preset trainers bring their network shape; budget trainers take their budget from the environment."""

import pytest
import torch
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
        ("EquiFlexTrainerMini4", "mini4"),
        ("EquiFlexTrainerMicro4", "micro4"),
        ("EquiFlexTrainerTinyLiftRef", "tiny_liftref"),
        ("EquiFlexTrainerTinyLift4", "tiny_lift4"),
        ("EquiFlexTrainerSmallLift4", "small_lift4"),
        ("EquiFlexTrainerTinyLiftHead", "tiny_lifthead"),
        ("EquiFlexTrainerTinyLift4RPB", "tiny_lift4_rpb"),
        ("EquiFlexTrainerTinyLift4Conv", "tiny_lift4_conv"),
        ("EquiFlexTrainerSmallLift4Conv", "small_lift4_conv"),
        ("EquiFlexTrainerTinyConv", "tiny_conv"),
        ("EquiFlexTrainerTinyConvCN", "tiny_conv_cn"),
    ],
)
@pytest.mark.parametrize("planned", ["tiny", "mini4", "vit_s8"])
def test_named_trainers_build_their_preset_over_plans_of_another(trainer, preset, planned):
    """The preset's whole shape: settings the preset leaves at their defaults (no refinement, the lifted blocks as
    the global ones) do not leak from plans of a preset that sets them (tiny's refinement, mini4's 2 global)."""
    if planned == preset:
        planned = "vit_ti8"
    manager = plans_naming(planned)
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
    refinement = net.decoder.refinement
    assert (refinement is not None) == expected.get("refine", False)
    if refinement is not None:
        assert (refinement.lifted_over is not None) == (expected.get("refine_mode") == "lifted")


def test_default_trainer_over_the_default_plans_is_the_measured_named_trainer():
    """What `nnunet-equiflex plan` + `-tr EquiFlexTrainer` train is what the frontier measured for the default:
    the same network (same weights from the same seed) and the same recipe as its named trainer."""
    manager = plans_naming(DEFAULT_PRESET)
    config = manager.get_configuration("2d")
    named = [
        cls
        for cls in _equiflex_trainer_classes()
        if cls is not equiflex_trainers.EquiFlexTrainer and cls.__dict__.get("network_preset") == DEFAULT_PRESET
    ]
    assert len(named) == 1, named  # the one-change subclass that pins the default's preset (the frontier's row)
    measured = named[0]
    nets = []
    for cls in (equiflex_trainers.EquiFlexTrainer, measured):
        torch.manual_seed(0)
        nets.append(cls.build_network_architecture(manager, config, 1, 3, False))
    for (name, a), (_, b) in zip(nets[0].state_dict().items(), nets[1].state_dict().items()):
        assert torch.equal(a, b), name
    kwargs = equiflex_trainers._configured_kwargs(measured, config)
    recipe = equiflex_trainers.trainer_recipe
    assert recipe(equiflex_trainers.EquiFlexTrainer, kwargs) == recipe(measured, kwargs)
    assert recipe(equiflex_trainers.EquiFlexTrainer, kwargs).lr == 2e-3
    # over plans of a 12-block ViT the default trainer takes the ViT recipe, as the ViT-S/8 trainers do
    vit_plans = plans_naming("vit_s8").get_configuration("2d")
    vit = equiflex_trainers._configured_kwargs(equiflex_trainers.EquiFlexTrainer, vit_plans)
    assert recipe(equiflex_trainers.EquiFlexTrainer, vit) == equiflex_trainers.VIT_RECIPE
    assert recipe(equiflex_trainers.EquiFlexTrainerViTS8, vit) == equiflex_trainers.VIT_RECIPE


def test_default_trainer_follows_the_plans_and_flex_trainer_is_its_ablation():
    manager = plans_naming("vit_ti8")
    config = manager.get_configuration("2d")
    net = equiflex_trainers.EquiFlexTrainer.build_network_architecture(manager, config, 1, 3, False)
    assert net.encoder.embed_dim == 192  # the plans' network wins for the default trainer
    assert equiflex_trainers.EquiFlexTrainer.network_preset == DEFAULT_PRESET
    ablation = equiflex_trainers.FlexTrainerFlip0.build_network_architecture(manager, config, 1, 3, False)
    assert ablation.encoder.group == "none" and ablation.encoder.embed_dim == 384
    assert ablation.encoder.n_global_blocks == 2


@pytest.mark.parametrize("planned", ["vit_ti8", DEFAULT_PRESET])
def test_pretrained_trainer_keeps_the_checkpoints_shape_over_plans_of_another_preset(planned):
    """DINO ViT-S/8 weights need the ViT-S/8 shape (its position grid, no refinement head), whichever preset
    `nnunet-equiflex plan` wrote; the lifting is the plans'."""
    manager = plans_naming(planned)
    cls = equiflex_trainers.EquiFlexTrainerPretrained
    with torch.device("meta"):
        net = cls.build_network_architecture(manager, manager.get_configuration("2d"), 1, 3, False)
    enc = net.encoder
    assert (enc.embed_dim, len(enc.blocks), enc.patch_size) == (384, 12, 8)
    assert enc.pos_embed_grid == (28, 28)
    assert net.decoder.refinement is None
    expected = preset_kwargs(planned)
    assert (enc.n_lifted_blocks, enc.group_pooling) == (expected["n_lifted_blocks"], expected["group_pooling"])


def test_budget_trainers_need_a_valid_budget(monkeypatch):
    monkeypatch.setenv("EQUIFLEX_BUDGET", "3,20,2")
    assert baseline_trainers.budget_from_env() == (3, 20, 2)
    for value in ("", "3,20", "3,x,2", "0,20,2"):
        monkeypatch.setenv("EQUIFLEX_BUDGET", value)
        with pytest.raises(RuntimeError, match="EPOCHS,ITERATIONS_PER_EPOCH,VALIDATION_ITERATIONS"):
            baseline_trainers.budget_from_env()
    assert baseline_trainers.EquiFlexTrainerFlip0_budget.__mro__[1] is equiflex_trainers.EquiFlexTrainerFlip0
    assert baseline_trainers.nnUNetTrainer_budget.__name__ == "nnUNetTrainer_budget"


def _equiflex_trainer_classes() -> list[type]:
    classes = {getattr(m, n) for m in (equiflex_trainers, baseline_trainers) for n in m.__all__}
    trainers = [c for c in classes if isinstance(c, type) and issubclass(c, equiflex_trainers.EquiFlexTrainer)]
    return sorted(trainers, key=lambda c: c.__name__)


def cnn_plans() -> PlansManager:
    """Plans whose 2d configuration names nnU-Net's CNN, as nnUNetPlans do."""
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 5},
        "_kw_requires_import": [],
    }
    return PlansManager({"configurations": {"2d": {"patch_size": [64, 64], "architecture": architecture}}})


def block_rates(net) -> list[float]:
    return [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in net.encoder.blocks]


@pytest.mark.parametrize("plans", ["EquiFlexPlans", "nnUNetPlans"])
@pytest.mark.parametrize("trainer", _equiflex_trainer_classes(), ids=lambda c: c.__name__)
def test_every_trainer_builds_its_documented_drop_path_with_either_plans(trainer, plans):
    """0.1 at the last block for the 12-block ViT-S/Ti networks, 0 for the tiny CPU trainers and for networks of up
    to 4 blocks (the default's), whatever the plans say."""
    manager = plans_naming("tiny") if plans == "EquiFlexPlans" else cnn_plans()
    if plans == "EquiFlexPlans":  # plans that ask for another rate: the trainer's recipe still wins
        manager.plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["drop_path_rate"] = 0.3
    # the shapes and rates without initialising 21M parameters per trainer (GMR's init reads values: on CPU)
    with torch.device("cpu" if issubclass(trainer, equiflex_trainers.EquiFlexTrainerGMR) else "meta"):
        net = trainer.build_network_architecture(manager, manager.get_configuration("2d"), 1, 3, False)
    depth = len(net.encoder.blocks)
    expected = 0.0 if issubclass(trainer, equiflex_trainers.EquiFlexTrainerTiny) or depth <= 4 else 0.1
    assert block_rates(net) == [(r, r) for r in torch.linspace(0, expected, depth).tolist()]
    assert block_rates(net)[-1] == pytest.approx((expected, expected))


@pytest.fixture
def toy_env(trained_toy, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, trained_toy["env"][key])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return trained_toy


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer,plans,expected_depth,expected",
    [
        ("EquiFlexTrainer", "EquiFlexPlans", 4, 0.0),
        ("EquiFlexTrainer", "nnUNetPlans", 4, 0.0),
        ("EquiFlexTrainerViTS8", "nnUNetPlans", 12, 0.1),
        ("EquiFlexTrainerTiny", "nnUNetPlans", 4, 0.0),
    ],
)
def test_initialized_trainer_trains_with_the_documented_recipe(toy_env, trainer, plans, expected_depth, expected):
    """Through nnU-Net's own trainer lookup and initialize(): the toy's EquiFlexPlans name the tiny network (depth 4),
    nnUNetPlans name the CNN (EquiFlexTrainer then builds the default, small_lift4_conv); the 12-block ViT-S/8 takes
    the ViT recipe, the 4-block networks the short one (learning rate, weight decay and drop path)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    instance = get_trainer_from_args("901", "2d", 0, trainer, plans, device=torch.device("cpu"))
    instance.initialize()
    recipe = equiflex_trainers.VIT_RECIPE if expected_depth == 12 else equiflex_trainers.SHORT_RECIPE
    assert (instance.initial_lr, instance.weight_decay) == (recipe.lr, recipe.weight_decay)
    assert instance.optimizer.param_groups[0]["lr"] <= recipe.lr
    rates = block_rates(instance.network)
    assert len(rates) == expected_depth
    assert rates[0] == (0.0, 0.0) and rates[-1] == pytest.approx((expected, expected))


def test_pretrained_tiny_smoke_trainer_stays_tiny():
    manager = plans_naming("vit_s8")
    cls = equiflex_trainers.EquiFlexTrainerPretrainedTiny_smoke
    net = cls.build_network_architecture(manager, manager.get_configuration("2d"), 1, 3, False)
    assert (net.encoder.embed_dim, len(net.encoder.blocks), net.encoder.patch_size) == (64, 4, 4)


def test_budget_trainers_checkpoint_every_epoch_so_a_killed_benchmark_resumes(monkeypatch):
    """nnU-Net writes checkpoint_latest every 50 epochs; a 12-epoch benchmark killed at epoch 10 would start over."""

    class Base:
        def __init__(self, plans, configuration, fold, dataset_json, device):
            self.save_every = 50

    monkeypatch.setenv("EQUIFLEX_BUDGET", "12,50,5")
    trainer = baseline_trainers.budget_variant(Base)(None, "2d", 0, None, torch.device("cpu"))
    assert trainer.save_every == 1
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (12, 50, 5)


def test_budget_trainers_take_the_sweeps_learning_rate_and_name_the_variable_on_a_bad_one(monkeypatch):
    class Base:
        def __init__(self, plans, configuration, fold, dataset_json, device):
            self.initial_lr = 0.01

    monkeypatch.setenv("EQUIFLEX_BUDGET", "12,50,5")
    variant = baseline_trainers.budget_variant(Base)
    monkeypatch.delenv("EQUIFLEX_LR", raising=False)
    assert variant(None, "2d", 0, None, torch.device("cpu")).initial_lr == 0.01  # unset: the trainer's own
    monkeypatch.setenv("EQUIFLEX_LR", "0.004")
    assert variant(None, "2d", 0, None, torch.device("cpu")).initial_lr == 0.004
    for value in ("x", "0", "-1e-3", "inf", "nan"):
        monkeypatch.setenv("EQUIFLEX_LR", value)
        with pytest.raises(RuntimeError, match=r"EQUIFLEX_LR=.*one positive number, e.g. export EQUIFLEX_LR=0.002"):
            variant(None, "2d", 0, None, torch.device("cpu"))
