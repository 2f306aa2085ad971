import json

import pytest
import torch

from pipeline import codec, generator
from pipeline.errors import UserError


def test_embedded_codec_round_trip_through_from_pretrained(tiny_codec):
    card = json.loads((tiny_codec / "cfkd_card.json").read_text())
    assert card["model"] == "AutoencoderTiny" and card["steps"] == 100
    assert {"psnr_64px_noise0", "psnr_64px_noise20", "noise_floor_64px_noise20", "psnr_128px_noise0"} <= set(
        card
    )
    assert list(tiny_codec.glob("*.safetensors"))
    c = generator.load(str(tiny_codec))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = c.encode(x)
    assert z.shape == (2, 4, 16, 16)  # two blocks: one halving
    assert c.decode(z).shape == x.shape
    assert generator.psnr(x, x) == float("inf") and generator.psnr(x, -x) < 10


def test_autoencoder_kl_loads_through_the_same_path(tmp_path):
    vae = codec.build_vae(codec.CodecConfig(kind="AutoencoderKL", channels=(8, 16)))
    vae.save_pretrained(tmp_path)
    c = generator.load(str(tmp_path))
    assert c.kind == "AutoencoderKL"
    assert c.decode(c.encode(torch.zeros(1, 3, 32, 32))).shape == (1, 3, 32, 32)


def test_loading_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="no such folder"):
        generator.load(str(tmp_path / "missing"))
    from diffusers import UNet2DModel

    UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(tmp_path / "unet")
    with pytest.raises(
        UserError, match="holds a UNet2DModel, expected one of AutoencoderKL, AutoencoderTiny"
    ):
        generator.load(str(tmp_path / "unet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        generator.load(str(tmp_path / "empty"))
    with pytest.raises(
        UserError, match="hub is unreachable.*huggingface-cli download madebyollin/taesd-not-cached"
    ):
        generator.load("madebyollin/taesd-not-cached")
    with pytest.raises(UserError, match="generator.unet"):
        generator.load_denoiser(str(tmp_path / "empty"))
