"""Reading foreign ViT checkpoints into the EquiFlexEncoder's parameter names.

One filter function, ``convert_state_dict``, renames and resamples (the pattern of timm's
``checkpoint_filter_fn``), so the network never branches on where its weights came from.
Understood layouts:

- timm and the original DINO / torch.hub release: our own names (``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.{i}.attn.qkv`` ...);
- DINOv2 from torch.hub (``register_tokens``, ``ls1.gamma``, optionally chunked
  ``blocks.{chunk}.{i}``) and from timm (``reg_token``, position embedding without a class entry);
- HF transformers ``ViTModel`` (``embeddings.*``, ``encoder.layer.{i}.attention.attention.query`` ...,
  optional ``vit.`` prefix) and ``Dinov2Model`` / ``Dinov2WithRegistersModel``.

Adaptations, each listed in the returned ``LoadReport``: the position embedding is resampled
bicubically to the encoder's ``pos_embed_grid`` (identity on the native grid), the patch
embedding is adapted to the number of input channels, LayerScale is folded into the preceding
projection when the network has none, and classification / self-supervision heads are dropped.
Nothing is downloaded: ``find_cached_checkpoint`` only looks in the local torch hub and HF caches.
The number of attention heads is not stored in a checkpoint; build the network with the
checkpoint's (ViT-S: 6).
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_equiflex.encoder import EquiFlexEncoder

# Containers around a state dict, tried in this order (DINO evaluates its teacher's weights).
WRAPPER_KEYS = ("teacher", "model", "state_dict", "model_state_dict", "network_weights", "student", "module")
# Whole-model wrappers (DistributedDataParallel, torch.compile): stripped from every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Sub-modules that hold the backbone next to heads (DINO, HF *ForImageClassification, our network).
BACKBONE_PREFIXES = ("backbone.", "vit.", "dinov2.", "encoder.", "model.")
# Keys found at the top of a ViT backbone in one of the layouts.
ANCHOR_KEYS = (
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "embeddings.cls_token",
    "embeddings.patch_embeddings.projection.weight",
)
# Classification / self-supervision heads and training-only tokens (names after renaming).
_DROPPED = re.compile(r"^(head|head_dist|fc_norm|classifier|pooler|pre_logits|dino_head|ibot_head)\.|^mask_token$")

# Foreign names -> ours (first match wins). HF ViT and HF DINOv2 differ only inside the layers.
_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(embeddings\.)?register_tokens$", "reg_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^encoder\.layer\.(\d+)\.(layernorm_before|norm1)\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.(layernorm_after|norm2)\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^layernorm\.", "norm."),
    (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # DINOv2 block chunks hold global block indices
]
_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in _RENAMES]


@dataclass
class LoadReport:
    """What a checkpoint contributed to the encoder, and what was changed on the way."""

    detected_format: str
    source: str = "a state dict"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    adaptations: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every encoder tensor came from the checkpoint and nothing was left over."""
        return not (self.missing or self.unexpected or self.skipped)

    def __str__(self) -> str:
        lines = [
            f"pretrained encoder weights from {self.source} ({self.detected_format}): "
            f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing"
        ]
        sections = (
            ("adaptations", self.adaptations),
            ("missing (left at their initial values)", self.missing),
            ("unexpected (ignored)", self.unexpected),
            ("skipped (shape mismatch)", self.skipped),
            ("dropped (heads, training-only tensors)", self.dropped),
        )
        for title, items in sections:
            if items:
                lines.append(f"  {title}:")
                lines.extend(f"    {item}" for item in items[:8])
                if len(items) > 8:
                    lines.append(f"    ... and {len(items) - 8} more")
        return "\n".join(lines)


def load_pretrained_encoder(
    network_or_encoder: nn.Module, checkpoint: str | os.PathLike | Mapping, strict_shapes: bool = True
) -> LoadReport:
    """Load a foreign ViT checkpoint into an EquiFlexFormer's encoder (or an EquiFlexEncoder).

    ``checkpoint`` is a file (.pth/.pt/.bin/.safetensors), a name known to
    ``find_cached_checkpoint`` (looked up in the local caches only), or an already loaded dict.
    With ``strict_shapes`` a shape that cannot be adapted raises a ValueError naming the fix;
    without it such tensors are skipped and listed in the report (a different embed_dim always
    raises: nothing would fit). The decoder is never touched.
    """
    encoder = _as_encoder(network_or_encoder)
    source = "a state dict"
    if not isinstance(checkpoint, Mapping):
        path = _resolve_checkpoint_path(checkpoint)
        source = str(path)
        checkpoint = read_checkpoint(path)
    state_dict, report = convert_state_dict(checkpoint, encoder, strict_shapes=strict_shapes)
    report.source = source
    with torch.no_grad():
        encoder.load_state_dict(state_dict, strict=False)
    return report


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_NNUNET_CHECKPOINT_KEYS = (b"network_weights", b"trainer_name", b"init_args")


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    """The raw content of a checkpoint file, read without executing code from it.

    Anything that is not a readable weight file (a folder, an empty, truncated or corrupt file, a pickle with
    Python objects) is a ValueError of one line that names the file, what was expected and the fix."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        hint = f" (it holds {', '.join(inside[:4])})" if inside else ""
        raise ValueError(f"checkpoint {path} is a folder; pass the weight file inside it{hint}, not the folder")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .pth/.pt/.bin/.safetensors file")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes), expected a weight file; copy or download it again")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise _corrupt(path, "a PyTorch checkpoint (torch.save)", error) from None
        if is_nnunet_checkpoint(path):
            raise ValueError(nnunet_checkpoint_message(path)) from None
        raise ValueError(
            f"torch.load(weights_only=True) refused {path}: it stores Python objects besides tensors "
            "(e.g. training arguments); if you trust the file, load it yourself with "
            "torch.load(path, weights_only=False) and pass the dict that holds the weights "
            "(e.g. checkpoint['teacher']) to load_pretrained_encoder"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # torch's zip reader, a cut-off legacy pickle
        raise _corrupt(path, "a PyTorch checkpoint (torch.save)", error) from None


def _read_safetensors(path: Path) -> Mapping:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError for every malformed file
        raise _corrupt(path, "a safetensors file", error) from None


def _corrupt(path: Path, expected: str, error: Exception) -> ValueError:
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return ValueError(
        f"cannot read {path} as {expected} ({detail}); the file is truncated or not a checkpoint: "
        "copy or download it again"
    )


def is_nnunet_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an nnU-Net training checkpoint (``checkpoint_final.pth`` ...), judged from the key
    names in its pickle, read as bytes: nothing in the file is executed."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            data = archive.read(name) if name else b""
    except (zipfile.BadZipFile, OSError):
        return False
    return all(key in data for key in _NNUNET_CHECKPOINT_KEYS)


def nnunet_checkpoint_message(path: Path) -> str:
    return (
        f"{path} is an nnU-Net training checkpoint (network_weights, trainer_name, init_args), not a foreign ViT "
        f"checkpoint; to start training from it, pass it to nnU-Net: nnUNetv2_train ... -pretrained_weights {path}"
    )


def convert_state_dict(
    state_dict: Mapping, encoder: nn.Module, strict_shapes: bool = True
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename and resample a foreign state dict into ``encoder``'s names (no ``encoder.`` prefix).

    Returns the tensors to load (shapes and dtypes equal to the encoder's) and the report.
    """
    encoder = _as_encoder(encoder)
    flat, notes, outside = unwrap_state_dict(state_dict)
    report = LoadReport(detected_format=detect_format(flat), adaptations=notes, dropped=outside)
    target = encoder.state_dict()

    renamed: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        new_key = _rename(key)
        if _DROPPED.match(new_key):
            report.dropped.append(key)
        else:
            renamed[new_key] = value.float() if value.is_floating_point() else value
    _merge_qkv(renamed, report)
    _check_architecture(renamed, encoder, strict_shapes)
    _convert_layer_scale(renamed, target, report)
    _convert_pos_embed(renamed, encoder, report, strict_shapes)
    _convert_patch_embed(renamed, target, report)

    converted: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        if key not in target:
            report.unexpected.append(key)
        elif value.shape != target[key].shape:
            message = _shape_message(key, tuple(value.shape), tuple(target[key].shape))
            if strict_shapes:
                raise ValueError(message)
            report.skipped.append(message)
        else:
            converted[key] = value.to(target[key].dtype)
    report.loaded = [key for key in target if key in converted]
    report.missing = [key for key in target if key not in converted]
    if not converted:
        sample = ", ".join(list(flat)[:6])
        raise ValueError(
            f"no encoder weights recognised in the checkpoint (detected format: {report.detected_format}; "
            f"first keys: {sample}); expected a timm/DINO, DINOv2 or HF transformers ViT state dict"
        )
    return converted, report


def unwrap_state_dict(checkpoint: Mapping) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Find the backbone's tensors inside a checkpoint: (tensors, notes, keys left outside)."""
    notes: list[str] = []
    trail: list[str] = []
    obj = checkpoint
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ValueError(
                f"no tensors found in the checkpoint (top-level keys: {', '.join(map(str, list(obj)[:10]))}); "
                "pass the dict that holds the weights"
            )
        trail.append(key)
        obj = obj[key]
    if trail:
        notes.append("weights taken from checkpoint" + "".join(f"[{k!r}]" for k in trail))
    state_dict = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in WRAPPER_PREFIXES:
        state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}

    outside: list[str] = []
    stripped = True
    while stripped and not any(a in state_dict for a in ANCHOR_KEYS):
        stripped = False
        for prefix in BACKBONE_PREFIXES:
            inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if any(a in inner for a in ANCHOR_KEYS):
                outside += [k for k in state_dict if not k.startswith(prefix)]
                notes.append(f"backbone taken from the keys under {prefix!r}")
                state_dict, stripped = inner, True
                break
    return state_dict, notes, outside


def detect_format(state_dict: Mapping) -> str:
    """A human-readable name of the checkpoint's layout (for the report; conversion does not need it)."""
    keys = set(state_dict)
    if any(k.startswith("embeddings.") for k in keys):
        registers = " with registers" if "embeddings.register_tokens" in keys else ""
        if any(".layer_scale1." in k or ".mlp.fc1." in k for k in keys):
            return f"HF transformers Dinov2Model{registers}"
        return "HF transformers ViTModel"
    if "register_tokens" in keys or "mask_token" in keys:
        return "DINOv2 torch.hub" + (" with registers" if "register_tokens" in keys else "")
    if "reg_token" in keys or any(k.endswith(".ls1.gamma") for k in keys):
        return "timm (DINOv2-style: LayerScale / registers)"
    if "cls_token" in keys or any(k.startswith("blocks.") for k in keys):
        return "timm / DINO torch.hub"
    return "unknown"


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Patch-embedding filters for ``in_channels`` inputs that keep the response to a gray image.

    Fewer channels than the checkpoint: source filter k is added to channel ``k % in_channels``
    (1 channel: the sum of the RGB filters). More: channel c gets source filter ``c % source``
    divided by how many channels share it. Either way the filters summed over the channels
    equal the original sum, so an image copied to every channel gives the checkpoint's response
    to that image copied to every RGB channel.
    """
    source = weight.shape[1]
    if in_channels == source:
        return weight
    if in_channels < source:
        folded = weight.new_zeros(weight.shape[0], in_channels, *weight.shape[2:])
        for k in range(source):
            folded[:, k % in_channels] += weight[:, k]
        return folded
    shares = [len(range(k, in_channels, source)) for k in range(source)]
    return torch.stack([weight[:, c % source] / shares[c % source] for c in range(in_channels)], dim=1)


def resample_patch_pos_embed(
    patch_pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Bicubic resampling of a ``(1, h*w, D)`` position embedding; identity when the grids match."""
    if tuple(old_grid) == tuple(new_grid):
        return patch_pos
    maps = patch_pos.reshape(1, *old_grid, -1).permute(0, 3, 1, 2).float()
    maps = F.interpolate(maps, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return maps.permute(0, 2, 3, 1).flatten(1, 2).to(patch_pos.dtype)


def inflate_patch_filter(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """2D patch filters ``(D, C, ph, pw)`` as 3D ``(D, C, depth, ph, pw)``: each slice gets ``1/depth`` of the
    filter, so a token of identical slices embeds as the 2D token of one of them (the rule of I3D's inflation)."""
    return weight[:, :, None].expand(-1, -1, depth, -1, -1) / depth


def inflate_pos_embed(patch_pos: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """A ``(1, h*w, D)`` in-plane position embedding repeated along depth to the ``(d, h, w)`` grid, depth-major
    as the encoder flattens its tokens: every slice of tokens starts from the 2D model's positions."""
    return patch_pos.repeat(1, grid[0], 1)


@dataclass(frozen=True)
class KnownCheckpoint:
    """Where a public checkpoint lands in the local caches once downloaded."""

    torch_hub_file: str
    hf_repos: tuple[str, ...]
    hub_entry: str


KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    "dino_vits8": KnownCheckpoint(
        "dino_deitsmall8_pretrain.pth",
        ("facebook/dino-vits8", "timm/vit_small_patch8_224.dino"),
        "torch.hub.load('facebookresearch/dino:main', 'dino_vits8')",
    ),
    "dino_vits16": KnownCheckpoint(
        "dino_deitsmall16_pretrain.pth",
        ("facebook/dino-vits16", "timm/vit_small_patch16_224.dino"),
        "torch.hub.load('facebookresearch/dino:main', 'dino_vits16')",
    ),
    "dinov2_vits14": KnownCheckpoint(
        "dinov2_vits14_pretrain.pth",
        ("facebook/dinov2-small", "timm/vit_small_patch14_dinov2.lvd142m"),
        "torch.hub.load('facebookresearch/dinov2', 'dinov2_vits14')",
    ),
    "dinov2_vits14_reg": KnownCheckpoint(
        "dinov2_vits14_reg4_pretrain.pth",
        ("facebook/dinov2-with-registers-small", "timm/vit_small_patch14_reg4_dinov2.lvd142m"),
        "torch.hub.load('facebookresearch/dinov2', 'dinov2_vits14_reg')",
    ),
}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def find_cached_checkpoint(name: str) -> Path | None:
    """A local copy of checkpoint ``name`` in the torch hub or HF hub cache, or None. Never downloads.

    ``name`` is a key of ``KNOWN_CHECKPOINTS`` (e.g. ``"dino_vits8"``), an HF repo id
    (``"facebook/dino-vits8"``) or a file name in the torch hub's ``checkpoints`` folder.
    """
    if name in KNOWN_CHECKPOINTS:
        known = KNOWN_CHECKPOINTS[name]
        hub_files, repos = (known.torch_hub_file,), known.hf_repos
    elif "/" in name:
        hub_files, repos = (), (name,)
    elif Path(name).suffix in (".pth", ".pt", ".bin", ".safetensors"):
        hub_files, repos = (name,), ()
    else:
        raise ValueError(
            f"unknown checkpoint name {name!r}; use one of {', '.join(KNOWN_CHECKPOINTS)}, "
            "an HF repo id such as 'facebook/dino-vits8', or a path to the file"
        )
    for file_name in hub_files:
        path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if path.is_file():
            return path
    for repo in repos:
        path = _find_in_hf_cache(repo)
        if path is not None:
            return path
    return None


def hf_hub_cache_dir() -> Path:
    """The HF hub cache folder, resolved from the environment as huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "huggingface" / "hub"


def _find_in_hf_cache(repo: str) -> Path | None:
    repo_dir = hf_hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    # The snapshot that refs/main points at first, then the others, newest first.
    ordered = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        main = snapshots / main_ref.read_text().strip()
        ordered = [main] + [p for p in ordered if p != main]
    for snapshot in ordered:
        for file_name in HF_WEIGHT_FILES:
            if (snapshot / file_name).is_file():  # follows the blob symlink; a dangling one is skipped
                return snapshot / file_name
    return None


def _resolve_checkpoint_path(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint)
    if path.is_file() or str(checkpoint) not in KNOWN_CHECKPOINTS:
        return path
    cached = find_cached_checkpoint(str(checkpoint))
    if cached is None:
        known = KNOWN_CHECKPOINTS[str(checkpoint)]
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r} is not in the local caches ({Path(torch.hub.get_dir()) / 'checkpoints'}, "
            f"{hf_hub_cache_dir()}); download it once where there is internet, e.g. "
            f"`huggingface-cli download {known.hf_repos[0]}` or {known.hub_entry}, or pass the file's path"
        )
    return cached


def _as_encoder(module: nn.Module) -> EquiFlexEncoder:
    for candidate in (
        module,
        getattr(module, "encoder", None),
        getattr(getattr(module, "module", None), "encoder", None),
    ):
        if isinstance(candidate, EquiFlexEncoder):
            return candidate
    raise TypeError(f"expected an EquiFlexFormer or EquiFlexEncoder, got {type(module).__name__}")


def _rename(key: str) -> str:
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key


def _merge_qkv(state_dict: dict[str, torch.Tensor], report: LoadReport) -> None:
    """HF stores separate query/key/value projections; ours is one ``qkv`` with outputs q, k, v."""
    merged = 0
    for key in [k for k in state_dict if ".attn.query." in k]:
        stem, param = key.split(".attn.query.")
        parts = [f"{stem}.attn.{name}.{param}" for name in ("query", "key", "value")]
        if all(p in state_dict for p in parts):
            state_dict[f"{stem}.attn.qkv.{param}"] = torch.cat([state_dict.pop(p) for p in parts], dim=0)
            merged += 1
    if merged:
        report.adaptations.append(f"attention query/key/value merged into attn.qkv ({merged} tensors)")


def _block_indices(keys) -> set[int]:
    return {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}


def _check_architecture(state_dict: dict[str, torch.Tensor], encoder: EquiFlexEncoder, strict: bool) -> None:
    """Mismatches that no resampling can fix, reported before any per-tensor message."""
    width = next((state_dict[k].shape[-1] for k in ("cls_token", "norm.weight") if k in state_dict), None)
    if width is not None and width != encoder.embed_dim:
        hint = " (a ViT-S)" if encoder.embed_dim == 384 else ""
        raise ValueError(
            f"embed_dim {width} in the checkpoint vs {encoder.embed_dim} in the network; build the network "
            f"with embed_dim={width} and the checkpoint's depth and num_heads (ViT-S: 384/12/6, ViT-B: 768/12/12), "
            f"or load a checkpoint with embed_dim {encoder.embed_dim}{hint}"
        )
    blocks = _block_indices(state_dict)
    depth = len(encoder.blocks)
    if strict and blocks and max(blocks) + 1 != depth:
        raise ValueError(
            f"depth {max(blocks) + 1} in the checkpoint vs {depth} in the network; build the network with "
            f"depth={max(blocks) + 1} (n_lifted_blocks counts within it), or pass strict_shapes=False to load "
            "the blocks both have and list the rest in the report"
        )
    registers = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    if strict and registers and registers != encoder.num_register_tokens:
        raise ValueError(_shape_message("reg_token", (1, registers, width), (1, encoder.num_register_tokens, width)))


def _convert_layer_scale(
    state_dict: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> None:
    """Keep LayerScale where the network has it; otherwise fold ``gamma`` into the projection before it.

    ``x + gamma * (W h + b) = x + (gamma W) h + gamma b``: the folded network computes the same.
    """
    folded = filled = 0
    for block in sorted(_block_indices(state_dict)):
        for scale, linear in (("ls1", "attn.proj"), ("ls2", "mlp.fc2")):
            gamma_key = f"blocks.{block}.{scale}.gamma"
            weight_key, bias_key = f"blocks.{block}.{linear}.weight", f"blocks.{block}.{linear}.bias"
            if gamma_key in state_dict and gamma_key not in target and weight_key in state_dict:
                gamma = state_dict.pop(gamma_key)
                state_dict[weight_key] = state_dict[weight_key] * gamma[:, None]
                if bias_key in state_dict:
                    state_dict[bias_key] = state_dict[bias_key] * gamma
                folded += 1
            elif gamma_key in target and gamma_key not in state_dict and weight_key in state_dict:
                state_dict[gamma_key] = torch.ones_like(target[gamma_key], dtype=torch.float32)
                filled += 1
    if folded:
        report.adaptations.append(
            f"LayerScale folded into attn.proj / mlp.fc2 ({folded} scales): the network has none; outputs are "
            "unchanged (build with layer_scale_init set to keep it as a parameter)"
        )
    if filled:
        report.adaptations.append(f"LayerScale gamma set to 1 ({filled} scales): the checkpoint has none")


def _infer_pos_grid(length: int, candidates: tuple[int, ...], grid: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """The checkpoint's token grid and how many prefix entries its position embedding has."""
    for prefix in dict.fromkeys(candidates):
        n = length - prefix
        if n == grid[0] * grid[1]:
            return grid, prefix
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:
            return (side, side), prefix
    raise ValueError(
        f"cannot read a token grid from a position embedding of length {length} (tried {list(candidates)} "
        f"prefix entries and a square or {grid[0]}x{grid[1]} grid); resample pos_embed to a square grid first"
    )


def _convert_pos_embed(
    state_dict: dict[str, torch.Tensor], encoder: EquiFlexEncoder, report: LoadReport, strict: bool
) -> None:
    """Ours is ``[class entry, grid entries]``; registers have no entry, as in DINOv2."""
    if "pos_embed" not in state_dict:
        return
    pos = state_dict["pos_embed"]
    pos = pos[None] if pos.ndim == 2 else pos
    registers = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    in_plane = encoder.pos_embed_grid[-2:]
    try:
        old_grid, prefix = _infer_pos_grid(pos.shape[1], (1, 0, 1 + registers), in_plane)
    except ValueError:
        if strict:
            raise
        return  # left as is: reported as a shape mismatch
    if prefix == 0:
        # timm's no_embed_class layout: the class token's position is already part of cls_token.
        class_entry = pos.new_zeros(1, 1, pos.shape[-1])
        report.adaptations.append("pos_embed has no class-token entry (timm no_embed_class); using 0 for it")
    else:
        class_entry = pos[:, :1]
    if prefix > 1:
        state_dict["reg_token"] = state_dict["reg_token"] + pos[:, 1:prefix]
        report.adaptations.append("register-token position entries added to reg_token (ours have none)")
    patch_pos = resample_patch_pos_embed(pos[:, prefix:], old_grid, in_plane)
    if old_grid != in_plane:
        report.adaptations.append(
            f"pos_embed resampled bicubically from {old_grid[0]}x{old_grid[1]} to {in_plane[0]}x{in_plane[1]} tokens"
        )
    if len(encoder.pos_embed_grid) == 3:
        patch_pos = inflate_pos_embed(patch_pos, encoder.pos_embed_grid)
        report.adaptations.append(
            f"pos_embed inflated to 3D: the in-plane grid repeated along depth ({encoder.pos_embed_grid[0]} slices)"
        )
    state_dict["pos_embed"] = torch.cat([class_entry, patch_pos], dim=1)


def _convert_patch_embed(
    state_dict: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport
) -> None:
    key = "patch_embed.proj.weight"
    if key not in state_dict or key not in target:
        return
    weight, want = state_dict[key], target[key].shape
    if weight.ndim == 4 and len(want) == 5 and weight.shape[2:] == want[3:]:
        weight = state_dict[key] = inflate_patch_filter(weight, want[2])
        report.adaptations.append(
            f"{key}: 2D filters inflated to 3D, spread evenly over {want[2]} slices (a volume constant along depth "
            "gives the 2D response)"
        )
    if weight.ndim != len(want) or weight.shape[2:] != want[2:] or weight.shape[1] == want[1]:
        return  # nothing to adapt, or a patch-size mismatch reported by the shape check
    state_dict[key] = adapt_input_channels(weight, want[1])
    how = "sum of the filters" if want[1] == 1 else "filters shared out so their sum is kept"
    report.adaptations.append(
        f"{key}: {weight.shape[1]} -> {want[1]} input channels ({how}; an image copied to every channel "
        "gives the pretrained response)"
    )


def _shape_message(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """The error for one tensor that cannot be adapted, naming the fix where one is known."""
    if key == "patch_embed.proj.weight" and got[2:] != want[2:]:
        size = "x".join(map(str, got[2:]))
        if len(want) == 5:  # a 2D checkpoint inflates along depth: only the in-plane size must match
            fix = f"build the network with patch_size=[{want[2]}, {got[-2]}, {got[-1]}]"
        else:
            fix = f"build the network with patch_size={got[2]} (inputs must then be multiples of {got[2]})"
        return (
            f"{key}: patch size {size} in the checkpoint vs {'x'.join(map(str, want[2:]))} in the network "
            f"(shapes {got} vs {want}); {fix} or load a checkpoint with patch size {want[-1]}"
        )
    if re.fullmatch(r"blocks\.\d+\.mlp\.fc1\.weight", key):
        return (
            f"{key}: MLP width {got[0]} in the checkpoint vs {want[0]} in the network (shapes {got} vs {want}); "
            f"build the network with mlp_ratio={got[0] / got[1]:g}"
        )
    if key == "reg_token":
        return (
            f"{key}: the checkpoint has {got[1]} register tokens, the network {want[1]} (shapes {got} vs {want}); "
            f"build the network with num_register_tokens={got[1]}"
        )
    return (
        f"{key}: shape {got} in the checkpoint vs {want} in the network; build the network with the checkpoint's shape"
    )
