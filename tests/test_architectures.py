"""SD-size architectures with random weights: the published shapes, built without memory on ``meta`` and
filled from a seed."""

import pytest
import torch

from binding.architectures import ARCHITECTURES, build_arch_pipeline, fill_random


def _meta_counts(name: str) -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**arch.unet), "vae": AutoencoderKL(**arch.vae),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.text_encoder))}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}


@pytest.mark.parametrize(
    "name, counts",
    [
        # the parameter counts of the published checkpoints (SD 1.5's "860M UNet", CLIP ViT-L/14's text tower,
        # SD 2.x's UNet and the 23 layers of OpenCLIP ViT-H/14's text tower; the same kl-f8 VAE)
        ("sd-1.5", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
        ("sd-2.1-base", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
    ],
)
def test_the_configs_have_the_published_sizes(name, counts):
    assert _meta_counts(name) == counts


def test_sd_layouts_read_the_16x16_grid_at_512px():
    from diffusers import UNet2DConditionModel

    from binding.attention import AttentionCapture

    for name, heads in (("sd-1.5", 8), ("sd-2.1-base", 20)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**ARCHITECTURES[name].unet)
        cap = AttentionCapture(unet, 512, 512, 8, attributes=True)
        assert cap.grid == (16, 16)
        assert len(cap.read_layers) == 5 and {l.heads for l in cap.read_layers} == {heads}
        assert sorted({l.grid for l in cap.attribute_layers}) == [(32, 32), (64, 64)]


def test_fill_is_seeded_scaled_and_complete():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with torch.device("meta"):
        a, b = CLIPTextModel(cfg), CLIPTextModel(cfg)
    a, b = a.to_empty(device="cpu"), b.to_empty(device="cpu")
    fill_random(a, torch.Generator().manual_seed(0))
    fill_random(b, torch.Generator().manual_seed(0))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    (ids,) = [b for name, b in a.named_buffers() if name.endswith("position_ids")]
    assert torch.equal(ids[0], torch.arange(77))
    params = {name.removeprefix("text_model."): p for name, p in a.named_parameters()}
    w = params["encoder.layers.0.mlp.fc2.weight"]  # fan-in 64: std 1 / sqrt(3 * 64)
    assert w.std().item() == pytest.approx((3 * 64) ** -0.5, rel=0.05)
    assert params["final_layer_norm.weight"].eq(1).all() and params["final_layer_norm.bias"].eq(0).all()
    out = a(torch.tensor([[0, 5, 7, 1]])).last_hidden_state
    assert torch.isfinite(out).all()


def test_fill_refuses_a_buffer_it_does_not_know():
    m = torch.nn.Linear(2, 2)
    m.register_buffer("mystery", torch.zeros(3))
    with pytest.raises(ValueError, match="mystery"):
        fill_random(m, torch.Generator().manual_seed(0))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="sd-1.5"):
        build_arch_pipeline("sd-9")


@pytest.mark.slow  # builds 1.1B parameters (2 GB in bf16) and runs them
def test_arch_sd15_builds_and_guides():
    import dataclasses

    import numpy as np

    from binding.guidance import GuidedSampler
    from binding.methods import METHODS
    from binding.models import load_pipeline

    pipe = load_pipeline("arch:sd-1.5", dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.tokenizer("a red apple").input_ids == [49406, 320, 736, 3055, 49407]  # the shipped CLIP tokenizer
    again = build_arch_pipeline("sd-1.5", dtype=torch.bfloat16)
    assert torch.equal(again.unet.conv_in.weight, pipe.unet.conv_in.weight)  # seeded
    del again
    method = dataclasses.replace(METHODS["divide-bind"], max_refinement=1, first_max_refinement=1)
    (r,) = GuidedSampler(pipe)("a red apple and a green banana", 0, method, steps=1, height=128, width=128)
    assert r.grid == (4, 4) and r.counters["guided"]["grad_passes"] == 2
    assert np.isfinite(r.guided_latents).all() and np.abs(r.guided_latents - r.vanilla_latents).max() > 0
    assert r.guided_image.size == (128, 128)
