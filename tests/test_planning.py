"""The ViT memory model behind the planner's batch sizes."""

import pytest

from nnunet_equiflex.network import PRESETS, preset_kwargs
from nnunet_equiflex.planning import batch_size_for_memory, estimate_training_vram_gb


def test_memory_model_counts_every_block_activation():
    kwargs = preset_kwargs("vit_s8_flip0")
    one, two = (estimate_training_vram_gb((256, 224), b, 1, 4, kwargs) for b in (1, 2))
    tokens, d = 32 * 28 + 1, 384
    per_sample_blocks = 2 * (9 * d + 2 * 4 * d) * tokens * 12  # 34 bytes per token and channel, 12 blocks
    head = 4 * 256 * 224 * (4 + 1) * 3
    assert (two - one) * 1e9 == pytest.approx(per_sample_blocks + head)


def test_lifted_copies_and_width_order_the_batch_sizes():
    def batch(preset):
        return batch_size_for_memory((256, 224), 1, 4, preset_kwargs(preset), 8.0, max_batch_size=512)

    # 4 lifted blocks run on 4 copies: vit_s8 fits the smallest batch; the 192-wide ViT-Ti/8 the largest
    assert batch("vit_s8") < batch("vit_s8_flip2") < batch("vit_s8_flip0") < batch("vit_ti8")
    assert batch("vit_s8_flip4") == batch("vit_s8")  # global or local does not change the stored activations


def test_memory_model_keeps_a_lifted_refinement_per_group_element():
    symmetric, lifted = preset_kwargs("tiny"), preset_kwargs("tiny_liftref")
    extra = estimate_training_vram_gb((96, 80), 1, 1, 3, lifted) - estimate_training_vram_gb(
        (96, 80), 1, 1, 3, symmetric
    )
    refine_maps = 2 * 16 + 1  # features and hidden channels (16 each) and the image channel, 3 copies more
    assert extra * 1e9 == pytest.approx(4 * 96 * 80 * 3 * refine_maps * 3)


def test_memory_model_keeps_the_lifted_heads_maps_per_group_element():
    pooled, lifted = preset_kwargs("tiny_lift4"), preset_kwargs("tiny_lifthead")
    extra = estimate_training_vram_gb((96, 80), 1, 1, 3, lifted) - estimate_training_vram_gb((96, 80), 1, 1, 3, pooled)
    head_maps = 4 * 2 * (3 + 16)  # 4 copies of the upsampled and the pixel maps of 3 classes and 16 features
    assert extra * 1e9 == pytest.approx(4 * 96 * 80 * head_maps * 3)


def test_memory_model_keeps_the_conv_stems_maps_per_group_element():
    linear, conv = preset_kwargs("tiny_lift4"), preset_kwargs("tiny_lift4_conv")
    extra = estimate_training_vram_gb((96, 80), 1, 1, 3, conv) - estimate_training_vram_gb((96, 80), 1, 1, 3, linear)
    stem_values = 32 * (48 * 40 + 24 * 20)  # 32 channels (64 // 2) after each stride-2 stage
    assert extra * 1e9 == pytest.approx(2 * 3 * stem_values * 4)  # conv, norm and GELU outputs in 16 bits, 4 copies


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_gets_a_batch_within_the_bounds(preset):
    b = batch_size_for_memory((160, 160), 1, 3, preset_kwargs(preset), 8.0, max_batch_size=40, min_batch_size=2)
    assert 2 <= b <= 40


def test_memory_model_in_3d_counts_tokens_over_three_axes_and_8_lifted_copies():
    kwargs = preset_kwargs("tiny3d", patch_size=[2, 4, 4])
    one, two = (estimate_training_vram_gb((24, 96, 96), b, 1, 3, kwargs) for b in (1, 2))
    tokens, d, hidden = 12 * 24 * 24 + 1, 32, 64
    block_evals = 1 * 8 + 2  # one block on the 8 flips of the volume, two after the pooling
    per_sample_blocks = 2 * (9 * d + 2 * hidden) * tokens * block_evals
    head = 4 * 24 * 96 * 96 * (3 + 2 * 8 + 1) * 3
    assert (two - one) * 1e9 == pytest.approx(per_sample_blocks + head)


def test_3d_batch_grows_with_the_memory_target():
    kwargs = preset_kwargs("tiny3d", patch_size=[2, 4, 4])
    small, large = (batch_size_for_memory((48, 160, 160), 1, 3, kwargs, gb, max_batch_size=64) for gb in (4, 40))
    assert 2 <= small < large <= 64
