"""Atomic files, the resume fallback, and case publishing, without nnU-Net runs (the kill tests are in
test_fault_tolerance.py)."""

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from nnunet_equiflex.atomic import atomic_write, is_partial, partial_path, remove_stale_partials
from nnunet_equiflex.atomic_export import publish_case
from nnunet_equiflex.resume import UnreadableCheckpointError, checkpoint_problem, choose_checkpoint


def test_atomic_write_publishes_only_the_complete_file(tmp_path):
    target = tmp_path / "checkpoint_best.pth"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new ")
        assert target.read_bytes() == b"old"  # readers see the previous file until the block ends
        f.write(b"content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_best.pth"]


def test_failed_write_keeps_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="writer failed"):
        with atomic_write(target) as f:
            f.write(b"half")
            raise ValueError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_killed_writer_leaves_the_old_file_and_a_partial_that_is_cleaned(tmp_path):
    target = tmp_path / "checkpoint_latest.pth"
    target.write_bytes(b"old")
    script = textwrap.dedent(
        f"""
        import sys, time
        from nnunet_equiflex.atomic import atomic_write
        with atomic_write({str(target)!r}) as f:
            f.write(b"half of a new file")
            f.flush()
            print("writing", flush=True)
            time.sleep(600)
        """
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    partials = [p for p in tmp_path.iterdir() if p.name != target.name]
    assert len(partials) == 1 and is_partial(partials[0].name) and partials[0].name.startswith(".")
    assert remove_stale_partials(tmp_path) == []  # its writer is alive
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert target.read_bytes() == b"old"
    assert remove_stale_partials(tmp_path) == partials
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_stale_cleanup_keeps_live_writers_other_hosts_and_outputs(tmp_path):
    mine = partial_path(tmp_path / "case_1", ".nii.gz")  # this process is alive
    other_host = tmp_path / ".case_2.equiflex-partial.otherhost.1.nii.gz"
    output = tmp_path / "case_3.nii.gz"
    for path in (mine, other_host, output):
        path.write_bytes(b"x")
    assert is_partial(mine.name) and mine.name.endswith(".nii.gz")
    assert remove_stale_partials(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, other_host, output))


def test_publish_case_renames_every_file_and_needs_the_segmentation(tmp_path):
    final = tmp_path / "case_7"
    partial = partial_path(final)
    for ending in (".npz", ".pkl"):
        (tmp_path / f"{partial.name}{ending}").write_bytes(ending.encode())
    with pytest.raises(FileNotFoundError, match="export of case_7 wrote no .nii.gz file"):
        publish_case(partial, final, ".nii.gz")
    assert not list(tmp_path.glob("case_7*"))  # nothing published without the segmentation
    (tmp_path / f"{partial.name}.nii.gz").write_bytes(b"seg")
    publish_case(partial, final, ".nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_7.nii.gz", "case_7.npz", "case_7.pkl"]
    assert (tmp_path / "case_7.nii.gz").read_bytes() == b"seg"


def _checkpoint(path, epoch, truncate=False):
    torch.save({"network_weights": {"w": torch.ones(4096)}, "optimizer_state": {}, "current_epoch": epoch}, path)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def test_readable_pick_is_kept_without_a_log_line(tmp_path):
    lines = []
    picked = _checkpoint(tmp_path / "checkpoint_latest.pth", 7)
    assert choose_checkpoint(picked, continuing=True, log=lines.append) == picked
    assert lines == []


@pytest.mark.parametrize(
    "picked,fallback",
    [("checkpoint_latest.pth", "checkpoint_best.pth"), ("checkpoint_final.pth", "checkpoint_latest.pth")],
)
def test_unreadable_pick_falls_back_with_one_line(tmp_path, picked, fallback):
    _checkpoint(tmp_path / picked, 9, truncate=True)
    _checkpoint(tmp_path / fallback, 5)
    lines = []
    assert choose_checkpoint(tmp_path / picked, continuing=True, log=lines.append) == tmp_path / fallback
    assert len(lines) == 1
    assert lines[0].startswith(f"{picked} cannot be read (")
    assert lines[0].endswith(f"continuing from {fallback} (epoch 5)")


def test_nothing_readable_stops_with_the_list_and_the_fix(tmp_path):
    _checkpoint(tmp_path / "checkpoint_latest.pth", 9, truncate=True)
    _checkpoint(tmp_path / "checkpoint_best.pth", 5, truncate=True)
    (tmp_path / "checkpoint_final.pth").write_bytes(b"")
    with pytest.raises(UnreadableCheckpointError) as error:
        choose_checkpoint(tmp_path / "checkpoint_final.pth", continuing=True, log=print)
    message = str(error.value)
    assert f"Cannot continue the training in {tmp_path}: no checkpoint there can be read." in message
    assert "checkpoint_final.pth: unreadable (the file is empty)" in message
    assert "checkpoint_latest.pth: unreadable (" in message and "checkpoint_best.pth: unreadable (" in message
    assert f"mkdir {tmp_path / 'unreadable'} && mv {tmp_path}/checkpoint_*.pth" in message


def test_validation_does_not_silently_use_another_checkpoint(tmp_path):
    _checkpoint(tmp_path / "checkpoint_final.pth", 10, truncate=True)
    _checkpoint(tmp_path / "checkpoint_best.pth", 6)
    with pytest.raises(UnreadableCheckpointError) as error:
        choose_checkpoint(tmp_path / "checkpoint_final.pth", continuing=False, log=print)
    message = str(error.value)
    assert "checkpoint_best.pth: readable, epoch 6" in message
    assert "with --c instead of --val" in message


def test_problem_names_files_that_are_not_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "weights.pth")
    problem, epoch = checkpoint_problem(tmp_path / "weights.pth")
    assert epoch is None and problem.startswith("not a training checkpoint")
    assert checkpoint_problem(_checkpoint(tmp_path / "ok.pth", 3)) == (None, 3)
