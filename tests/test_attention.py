"""Attention capture: the read grid derived from the model, processors swapped only where read and restored."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from binding.attention import AttentionCapture, _nearest_rows, cross_attention_layers, latent_size, read_grid


@pytest.fixture(scope="module")
def sd_shaped_unet():
    """Stable Diffusion 1.x's block layout (4 levels, cross-attention in the first three) with tiny widths."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=8,
        layers_per_block=2,
        sample_size=64,
    )


def test_sd_layout_reads_the_16x16_layers_at_512px(sd_shaped_unet):
    unet = sd_shaped_unet
    assert latent_size(512, 512, 8) == (64, 64)
    assert read_grid(unet, 512, 512, 8) == (16, 16)  # latent side / 4
    with AttentionCapture(unet, 512, 512, 8) as cap:
        names = sorted(l.name for l in cap.read_layers)
    assert len(names) == 5  # down_blocks.2 (2 layers) and up_blocks.1 (3); the 8x8 mid block is not read
    assert sum(n.startswith("down_blocks.2.") for n in names) == 2
    assert sum(n.startswith("up_blocks.1.") for n in names) == 3
    grids = {l.name.split(".attentions")[0]: l.grid for l in cross_attention_layers(unet, 512, 512, 8)}
    assert grids == {
        "down_blocks.0": (64, 64),
        "down_blocks.1": (32, 32),
        "down_blocks.2": (16, 16),
        "mid_block": (8, 8),
        "up_blocks.1": (16, 16),
        "up_blocks.2": (32, 32),
        "up_blocks.3": (64, 64),
    }


def test_grid_follows_the_size(sd_shaped_unet, tiny):
    assert read_grid(sd_shaped_unet, 768, 768, 8) == (24, 24)  # SD 2.1 at 768 px
    assert read_grid(sd_shaped_unet, 512, 768, 8) == (16, 24)
    assert read_grid(tiny.unet, 64, 64, tiny.vae_scale_factor) == (16, 16)
    assert read_grid(tiny.unet, 128, 128, tiny.vae_scale_factor) == (32, 32)
    assert read_grid(tiny.unet, 64, 128, tiny.vae_scale_factor) == (16, 32)


def test_tiny_reads_its_coarse_level_including_the_mid_block(tiny):
    with AttentionCapture(tiny.unet, 64, 64, tiny.vae_scale_factor, attributes=True) as cap:
        assert {l.place for l in cap.read_layers} == {"down", "mid", "up"}
        assert all(l.grid == (16, 16) for l in cap.read_layers)
        assert cap.attribute_layers and all(l.grid == (32, 32) for l in cap.attribute_layers)
        assert [l.place for l in cap.aggregation_order] == sorted(
            (l.place for l in cap.read_layers), key=["up", "down", "mid"].index
        )


def test_processors_swapped_only_where_read_and_restored(tiny):
    unet = tiny.unet
    before = dict(unet.attn_processors)
    with AttentionCapture(unet, 64, 64, tiny.vae_scale_factor) as cap:
        during = unet.attn_processors
        read = {l.name for l in cap.read_layers}
        for name, proc in during.items():
            assert (proc is before[name]) == (name not in read)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(KeyError):  # restored on an error too
        with AttentionCapture(unet, 64, 64, tiny.vae_scale_factor):
            raise KeyError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())


def _inputs(pipe, batch=1):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 32, 32, generator=g)
    cond, uncond = pipe.encode_prompt("a red cat and a blue dog", "cpu", 1, True)
    return latents, cond, uncond


def test_unrecorded_pass_is_unchanged_and_display_maps_match_the_guidance_pass(tiny):
    unet = tiny.unet
    latents, cond, uncond = _inputs(tiny)
    t = torch.tensor(500)
    with torch.no_grad():
        plain = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    with AttentionCapture(unet, 64, 64, tiny.vae_scale_factor) as cap:
        with torch.no_grad():
            attached = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            with cap.record(batch_index=1) as rec:
                recorded = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            display = rec.maps()
        z = latents.clone().requires_grad_(True)
        with cap.record(stop_early=True) as rec:
            unet(z, t, encoder_hidden_states=cond)
        guided = rec.maps()
    assert torch.equal(plain, attached) and torch.equal(plain, recorded)  # recording for display changes nothing
    assert display.shape == guided.shape == (16, 16, 77)
    torch.testing.assert_close(display.sum(-1), torch.ones(16, 16))
    torch.testing.assert_close(display, guided.detach(), rtol=1e-4, atol=1e-6)  # cond half == batch-1 cond pass
    (grad,) = torch.autograd.grad(guided[..., 2].max(), z)
    assert grad.abs().sum() > 0


def test_early_stop_gives_the_same_maps_and_gradient(tiny):
    unet = tiny.unet
    latents, cond, _ = _inputs(tiny)
    t = torch.tensor(700)
    out = {}
    with AttentionCapture(unet, 64, 64, tiny.vae_scale_factor) as cap:
        for stop in (False, True):
            z = latents.clone().requires_grad_(True)
            with cap.record(stop_early=stop) as rec:
                unet(z, t, encoder_hidden_states=cond)
            maps = rec.maps()
            (grad,) = torch.autograd.grad(maps[..., 3].pow(2).sum(), z)
            out[stop] = (maps.detach(), grad)
    assert torch.equal(out[False][0], out[True][0])
    torch.testing.assert_close(out[False][1], out[True][1], rtol=1e-5, atol=1e-8)


def test_attribute_maps_are_the_nearest_downsampled_fine_maps(tiny):
    unet = tiny.unet
    latents, cond, _ = _inputs(tiny)
    with AttentionCapture(unet, 64, 64, tiny.vae_scale_factor, attributes=True) as cap:
        z = latents.clone().requires_grad_(True)
        with cap.record(attributes=True, stop_early=True) as rec:
            unet(z, torch.tensor(600), encoder_hidden_states=cond)
        fine = rec.attribute_maps()
        n_heads = sum(l.heads for l in cap.attribute_layers)
    assert fine.shape == (n_heads, 16, 16, 77)
    torch.testing.assert_close(fine.sum(-1), torch.ones(n_heads, 16, 16))
    (grad,) = torch.autograd.grad(fine[..., 2].sum(), z)
    assert grad.abs().sum() > 0
    # Not asked for: not computed.
    with AttentionCapture(unet, 64, 64, tiny.vae_scale_factor) as cap, torch.no_grad():
        with cap.record() as rec:
            unet(latents, torch.tensor(600), encoder_hidden_states=cond)
        assert rec.attribute_maps() is None


@pytest.mark.parametrize(
    "src,dst", [((32, 32), (16, 16)), ((64, 64), (16, 16)), ((48, 40), (24, 10)), ((20, 30), (16, 16))]
)
def test_kept_rows_equal_nearest_interpolation(src, dst):
    x = torch.randn(2, 5, *src)
    rows = _nearest_rows(src, dst, "cpu")
    expected = F.interpolate(x, size=dst, mode="nearest").flatten(2)
    assert torch.equal(x.flatten(2)[..., rows], expected)


def test_recording_needs_attachment_and_complete_passes(tiny):
    cap = AttentionCapture(tiny.unet, 64, 64, tiny.vae_scale_factor)
    with pytest.raises(RuntimeError, match="attach"):
        cap.record()
    with cap:
        with cap.record() as rec:
            pass
        with pytest.raises(RuntimeError, match="recorded 0"):
            rec.maps()


def test_wrong_size_is_reported(tiny):
    latents, cond, _ = _inputs(tiny)
    with AttentionCapture(tiny.unet, 128, 128, tiny.vae_scale_factor) as cap, torch.no_grad():
        with pytest.raises(RuntimeError, match="another image size"):
            with cap.record():
                tiny.unet(latents, torch.tensor(10), encoder_hidden_states=cond)
