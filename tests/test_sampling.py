"""Latent scaling helpers shared by every method."""
from types import SimpleNamespace

import pytest
import torch

from inference.sampling import scale_latents, unscale_latents, vae_scale_factor


@pytest.mark.parametrize("config", [
    dict(scaling_factor=0.13025),
    dict(scaling_factor=1.5305, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.1, 0.9, 1.3, 0.7]),
])
def test_scale_and_unscale_are_inverse(config):
    vae = SimpleNamespace(config=SimpleNamespace(**{"latents_mean": None, "latents_std": None, **config}))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unet_space = scale_latents(vae, z)
    assert not torch.allclose(unet_space, z)
    assert torch.allclose(unscale_latents(vae, unet_space), z, atol=1e-6)
    if "latents_mean" not in config:
        assert torch.allclose(unet_space, z * config["scaling_factor"])


def test_vae_scale_factor_follows_the_vae_depth():
    assert vae_scale_factor(SimpleNamespace(config=SimpleNamespace(block_out_channels=[8, 16, 32, 32]))) == 8
    assert vae_scale_factor(SimpleNamespace(config=SimpleNamespace(block_out_channels=[8, 16]))) == 2
