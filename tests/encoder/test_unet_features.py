"""How the UNet feature passes are batched."""

from __future__ import annotations


def test_small_models_take_more_images_per_pass():
    from oneword.encoder.unet_features import BATCH, MAX_BATCH, pass_size

    assert pass_size(512) == BATCH and pass_size(1024) == BATCH and pass_size(768) == BATCH
    assert pass_size(256) == 4 * BATCH and pass_size(32) == MAX_BATCH
