"""Half precision: the UNet runs in fp16/bf16 while the loss and the latent update stay fp32 (on CUDA the
UNet is fp16; the CPU runs the same code)."""

import numpy as np
import pytest
import torch

from binding.bench import capped
from binding.guidance import GuidanceError, GuidedSampler
from binding.methods import METHODS, method_names
from binding.models import load_pipeline

PROMPT = "a red apple and a green banana"


class Spy(GuidedSampler):
    """Records the dtype of every loss, gradient and updated latent of the guidance."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.seen = {"loss": set(), "gradient": set(), "update": set()}

    def _descend(self, z, total, alpha, trace):
        (grad,) = torch.autograd.grad(total, [z], retain_graph=True)
        out = super()._descend(z, total, alpha, trace)
        for k, v in (("loss", total), ("gradient", grad), ("update", out)):
            self.seen[k].add(v.dtype)
        return out


def test_a_half_precision_loss_is_refused(monkeypatch, tiny):
    from binding import guidance

    real = guidance.compute_terms
    monkeypatch.setattr(guidance, "compute_terms", lambda plan, rec, i: (real(plan, rec, i)[0].half(), {}, {}))
    with pytest.raises(GuidanceError, match="must be float32, got a torch.float16 loss"):
        GuidedSampler(tiny)(PROMPT, 0, "syngen", steps=2, runs=("guided",), decode=False)


@pytest.mark.slow  # CPU fp16 kernels are slow; refinement capped at 2 (random weights never meet a threshold)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_in_half_precision_end_to_end(dtype):
    pipe = load_pipeline("tiny", dtype=dtype)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {dtype}
    unet_inputs = set()
    hook = pipe.unet.register_forward_pre_hook(lambda mod, args: unet_inputs.add(args[0].dtype))
    try:
        (vanilla,) = GuidedSampler(pipe)(PROMPT, 0, "vanilla", steps=2)  # once: each method below runs guided only
        assert vanilla.vanilla_image.size == (64, 64)
        for method in method_names(guided_only=True):
            spy = Spy(pipe)
            (r,) = spy(PROMPT, 0, capped(METHODS[method], 2), steps=2, runs=("guided",))
            assert spy.seen == {"loss": {torch.float32}, "gradient": {torch.float32}, "update": {torch.float32}}
            assert r.settings["dtype"] == str(dtype).replace("torch.", "")
            assert np.isfinite(r.guided_latents).all() and np.abs(r.guided_latents - vanilla.vanilla_latents).max() > 0.1
            assert np.isfinite(r.guided_maps).all()
            assert r.guided_image.size == (64, 64)
            before = [v for vs in r.losses["guided_before_update"].values() for v in vs if v is not None]
            assert before and np.isfinite(before).all()
    finally:
        hook.remove()
    assert unet_inputs == {dtype}  # every UNet pass, guided or not, in half precision
