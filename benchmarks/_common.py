"""Shared pieces of the benchmarks: the header, timing with warm-up and medians, peak memory.

Every benchmark prints ratios against a baseline timed in the same run; absolute times are
printed next to them only as context.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def allow_many_compiles() -> None:
    """Each (sequence length, block size) pair is a new graph for compiled flex; dynamo's default
    recompile limit (8) would silently fall back to eager flex, which materialises the scores."""
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if key in dynamo_config._config:
            setattr(dynamo_config, key, 4096)


def print_header(title: str, device: torch.device) -> None:
    print(f"# {title}")
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    if device.type == "cuda":
        where = f"cuda: {torch.cuda.get_device_name(device)}"
    else:
        where = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"
    print(f"device: {where}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {platform.python_version()}")
    try:
        load = os.getloadavg()
        print(
            f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared machine: other jobs add noise)"
        )
    except OSError:
        pass
    if device.type == "cpu":
        print(
            "peak memory on CPU: increase of the process RSS during one extra, untimed call made after "
            "gc + glibc malloc_trim(0), sampled every 1 ms in a thread (approximate: activations and temporaries, "
            "not weights or optimizer state that already exist)"
        )
    else:
        print("peak memory on CUDA: torch.cuda.max_memory_allocated over the timed calls (tensors only)")
    print()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler:
    """Peak RSS increase while active (Linux /proc; 0 elsewhere)."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.available = os.path.exists("/proc/self/statm")
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> _RssSampler:
        if self.available:
            self.base = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def increase(self) -> int:
        return self.peak - self.base


@dataclass
class Timing:
    median_s: float
    times_s: list[float]
    peak_bytes: int

    @property
    def spread(self) -> float:
        """(max - min) / median over the repeats: how noisy this row was."""
        return (max(self.times_s) - min(self.times_s)) / self.median_s if self.median_s > 0 else 0.0


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_memory(fn: Callable[[], object]) -> int:
    """RSS increase during one call of ``fn``, after handing freed heap memory back to the OS (not timed)."""
    _trim_heap()
    with _RssSampler() as sampler:
        fn()
    return sampler.increase


def measure(
    fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1, probe_memory: bool = True
) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls (compiles happen there)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        peak = cpu_peak_memory(fn) if probe_memory else 0
    return Timing(statistics.median(times), times, peak)


def measure_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 1
) -> dict[str, Timing]:
    """Like ``measure`` for several callables, timed round-robin (A B C A B C ...), so that load
    changes on a shared machine hit every row alike instead of whichever row ran then."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int] = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for name, fn in fns.items():
            timing = measure(fn, device, repeats=1, warmup=0, probe_memory=False)
            times[name].append(timing.median_s)
            peaks[name] = max(peaks[name], timing.peak_bytes)
    if device.type != "cuda":
        peaks = {name: cpu_peak_memory(fn) for name, fn in fns.items()}
    return {name: Timing(statistics.median(times[name]), times[name], peaks[name]) for name in fns}


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table (readable in a terminal and pasteable into results files)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    print(flush=True)


def nnunet_architecture(patch_size: tuple[int, ...], spacing: tuple[float, ...] | None = None) -> dict:
    """The ``architecture`` entry nnU-Net's default planner (ExperimentPlanner, 2.8.1) writes for a 2D or 3D
    configuration (the axis count is ``len(patch_size)``), computed with its own ``get_pool_and_conv_props`` and
    constants (the code of ``get_plans_for_configuration``, minus the VRAM-driven patch search: the patch is
    given). Returns the architecture and the patch size the topology rounds it to."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    dims = len(patch_size)
    spacing = (1.0,) * dims if spacing is None else spacing
    # Constants set in ExperimentPlanner.__init__ (nnunetv2 2.8.1); they need a dataset to instantiate.
    base_features, max_features, min_edge, blocks_per_stage = 32, {2: 512, 3: 320}[dims], 4, 2
    _, strides, kernels, fitted_patch, _ = get_pool_and_conv_props(spacing, patch_size, min_edge, 999999)
    n_stages = len(strides)
    features = tuple(min(max_features, base_features * 2**i) for i in range(n_stages))
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": features,
            "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
            "kernel_sizes": [list(k) for k in kernels],
            "strides": [list(s) for s in strides],
            "n_conv_per_stage": [blocks_per_stage] * n_stages,
            "n_conv_per_stage_decoder": [blocks_per_stage] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    return architecture, tuple(int(p) for p in fitted_patch)


def build_cnn(architecture: dict, in_channels: int, num_classes: int, deep_supervision: bool) -> torch.nn.Module:
    """nnU-Net's own construction path from a plans ``architecture`` entry."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        in_channels,
        num_classes,
        allow_init=True,
        deep_supervision=deep_supervision,
    )
