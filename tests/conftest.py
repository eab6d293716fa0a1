import os

import pytest
import torch

# CI machines have 2 cores; keep intra-op threads bounded so parallel compile workers do not thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# The window attention compiles once per input shape (20-40 s on 2 cores); the tests use many tiny shapes, so
# they run it uncompiled (the same math), also in the nnU-Net subprocesses they start. The tests of the compiled
# path itself ask for it with the ``compiled_window`` fixture.
os.environ["EQUIFLEX_WINDOW_COMPILE"] = "0"


@pytest.fixture
def compiled_window(monkeypatch):
    monkeypatch.setenv("EQUIFLEX_WINDOW_COMPILE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_toy(tmp_path_factory):
    """Plan, preprocess, train (tiny EquiFlex, fold 0, CPU) and predict with the real console scripts."""
    from nnunet_env import nnunet_env, run, write_toy_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    raw = write_toy_dataset(root / "raw", 901)
    logs = root / "logs"
    logs.mkdir()
    run(
        ["nnUNetv2_plan_and_preprocess", "-d", "901", "-c", "2d", "-np", "1", "--verify_dataset_integrity"],
        env,
        logs / "plan_and_preprocess.txt",
    )
    run(["nnunet-equiflex", "plan", "-d", "901", "--preset", "tiny"], env, logs / "plan.txt")
    trainer = "EquiFlexTrainerTiny_smoke"
    run(
        ["nnUNetv2_train", "901", "2d", "0", "-tr", trainer, "-p", "EquiFlexPlans", "-device", "cpu"],
        env,
        logs / "train.txt",
    )
    predictions = root / "predictions"
    run(
        [
            "nnUNetv2_predict",
            "-i",
            str(raw / "imagesTs"),
            "-o",
            str(predictions),
            "-d",
            "901",
            "-c",
            "2d",
            "-tr",
            trainer,
            "-p",
            "EquiFlexPlans",
            "-f",
            "0",
            "-device",
            "cpu",
        ],
        env,
        logs / "predict.txt",
    )
    model_dir = root / "results" / raw.name / f"{trainer}__EquiFlexPlans__2d"
    return dict(root=root, env=env, raw=raw, trainer=trainer, model_dir=model_dir, predictions=predictions, logs=logs)


@pytest.fixture(scope="session")
def trained_toy_cnn(trained_toy):
    """nnU-Net's CNN with the same short budget as EquiFlexTrainerTiny_smoke, on the same dataset, plans and fold."""
    from nnunet_env import run

    trainer = "nnUNetTrainer_equiflexSmoke"
    run(
        ["nnUNetv2_train", "901", "2d", "0", "-tr", trainer, "-p", "nnUNetPlans", "-device", "cpu"],
        trained_toy["env"],
        trained_toy["logs"] / "train_cnn.txt",
    )
    return dict(trainer=trainer, model_dir=trained_toy["model_dir"].parent / f"{trainer}__nnUNetPlans__2d")
