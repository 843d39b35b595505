"""SDXL on the tiny SDXL model: vanilla equal to diffusers' StableDiffusionXLPipeline, each method lowering its
own loss, maps on the right grid, records that load back; the presets, the step-size rule and the GPU-only rules."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from binding.analysis import analyze
from binding.attention import AttentionCapture
from binding.guidance import GuidedSampler
from binding.models import PRESETS, ModelLoadError, load_pipeline
from binding.records import load_run, save_run, save_run_archive
from binding.settings import defaults_for, step_size_scale

PROMPT = "a red cat and a blue dog"  # CLIP: 1 a, 2 red, 3 cat, 4 and, 5 a, 6 blue, 7 dog
STEPS = 4  # Euler: 4 loop steps, all guided by the methods' 25 intervention steps
METHOD_TERMS = {
    "syngen": ("syngen_positive", "syngen_negative"),
    "attend-excite": ("ae_excite",),
    "divide-bind": ("divide_bind",),
}


@pytest.fixture(scope="module")
def pipe():
    """One thread for the module's small models (as ``one_thread``), given back after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_pipeline("tiny-sdxl")
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sampler(pipe):
    return GuidedSampler(pipe)


@pytest.fixture(scope="module")
def analysis():
    return analyze(PROMPT)


@pytest.fixture(scope="module")
def runs(sampler, analysis):
    """One vanilla + guided run per method, shared by the tests that read them."""
    return {m: sampler(PROMPT, 0, m, steps=STEPS, analysis=analysis)[0] for m in METHOD_TERMS}


def _diffusers_latents(pipe, seed, steps=STEPS, **kwargs):
    ref = StableDiffusionXLPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(seed)
    return ref(PROMPT, num_inference_steps=steps, generator=g, output_type="latent", **kwargs).images.numpy()


# ---------------------------------------------------------------------------------------------- the model


def test_tiny_sdxl_is_an_sdxl_pipeline(pipe):
    assert isinstance(pipe, StableDiffusionXLPipeline) and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    n = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())
    assert n < 6_000_000  # a few MB
    # SDXL's second tokenizer pads with "!" (id 0), the first with EOT: the same ids up to EOT, then different
    ids = [tok(PROMPT, padding="max_length", max_length=12).input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    assert ids[0][:9] == ids[1][:9] == [49406, 320, 736, 2368, 537, 320, 1746, 1929, 49407]
    assert ids[0][9:] == [49407] * 3 and ids[1][9:] == [0] * 3
    again = load_pipeline("tiny-sdxl")
    assert all(torch.equal(a, b) for a, b in zip(again.unet.state_dict().values(), pipe.unet.state_dict().values()))


def test_vanilla_equals_stable_diffusion_xl_pipeline(pipe, sampler, analysis):
    (r,) = sampler(PROMPT, 3, "vanilla", steps=STEPS, analysis=analysis, decode=False)
    ref = _diffusers_latents(pipe, 3)
    np.testing.assert_allclose(r.vanilla_latents, ref, rtol=0, atol=1e-5)
    assert r.settings["family"] == "sdxl" and r.settings["guidance_scale"] == 5.0  # SDXL's pipeline default
    (r,) = sampler(PROMPT, 1, "vanilla", steps=2, guidance_scale=7.5, negative_prompt="blurry", decode=False)
    np.testing.assert_allclose(r.vanilla_latents, _diffusers_latents(pipe, 1, steps=2, guidance_scale=7.5,
                                                                     negative_prompt="blurry"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", list(METHOD_TERMS))
def test_each_method_lowers_its_own_loss(pipe, runs, method):
    """The method's loss on the guided run's maps, step by step, below the same loss on the vanilla run's maps
    (same seed, same steps); the vanilla side is diffusers' own run."""
    r = runs[method]
    np.testing.assert_allclose(r.vanilla_latents, _diffusers_latents(pipe, 0), rtol=0, atol=1e-5)
    assert np.abs(r.guided_latents - r.vanilla_latents).max() > 0.1

    def total(run):
        return np.sum([r.losses[run][t] for t in METHOD_TERMS[method]], axis=0)

    vanilla, guided = total("vanilla"), total("guided")
    assert len(guided) == STEPS and (guided < vanilla).all(), (method, vanilla, guided)
    c = r.counters["guided"]
    assert c["grad_passes"] == STEPS + c["refinement_iterations"]


def test_maps_are_on_the_read_grid(pipe, runs):
    """SDXL cross-attends at the two coarser of its three levels; the losses read the coarsest (latents / 4, as
    32x32 at 1024 px), down, mid and up blocks alike; Divide & Bind's attributes the finer one."""
    r = runs["divide-bind"]
    assert r.grid == (16, 16) and r.tokens[0] == "<|startoftext|>" and r.n_tokens == 9
    assert r.vanilla_maps.shape == r.guided_maps.shape == (STEPS, 16, 16, 9)
    layers = r.settings["read_layers"]
    assert {name.split(".")[0] for name in layers} == {"down_blocks", "mid_block", "up_blocks"}
    assert not any(name.startswith(("down_blocks.1", "up_blocks.1")) for name in layers)
    assert r.guided_layer_maps.shape == (STEPS, len(layers), 16, 16, 9)
    words = r.final_maps("guided")[..., 1:8].astype(np.float32)
    assert np.isfinite(words).all() and (words >= 0).all() and words.sum() > 0
    assert r.guided_previews.shape == (STEPS, 4, 64, 64)
    for size, grid in ((128, (16, 16)), (256, (32, 32))):
        cap = AttentionCapture(pipe.unet, size, size, pipe.vae_scale_factor, attributes=True)
        assert cap.grid == grid and {l.grid for l in cap.attribute_layers} == {(grid[0] * 2, grid[1] * 2)}


def test_a_run_record_loads_back(runs, tmp_path):
    r = runs["syngen"]
    for saved in (save_run(r, tmp_path / "run"), save_run_archive(r, tmp_path / "run.zip")):
        back = load_run(saved)
        assert back.settings["family"] == "sdxl" and back.settings["model"] == "tiny-sdxl"
        assert back.settings["scheduler"] == "EulerDiscreteScheduler"
        assert [str(b) for b in back.bindings] == ["red -> cat", "blue -> dog"]
        np.testing.assert_array_equal(back.guided_latents, r.guided_latents)
        np.testing.assert_array_equal(back.guided_maps, r.guided_maps)
        assert back.losses["guided"] == r.losses["guided"]
        assert back.guided_image.size == (128, 128)


# ------------------------------------------------------------------------------------ the family's rules


def test_step_size_default_scales_with_the_latent_area(sampler, analysis):
    assert step_size_scale("sdxl", (128, 128)) == 4.0 and step_size_scale("sd", (128, 128)) == 1.0
    assert defaults_for("sdxl-base", "syngen")["step_size"] == 80.0  # 1024 px: 128x128 latents
    assert defaults_for("arch:sdxl", "attend-excite")["step_size"] == 80.0
    assert defaults_for("tiny-sdxl", "syngen")["step_size"] == 20.0  # 128 px: 64x64 latents
    assert defaults_for("sd-1.5", "syngen", latent=(128, 128))["step_size"] == 20.0  # SD keeps the papers'
    assert defaults_for("sdxl-base", "syngen")["guidance_scale"] == 5.0
    plan = sampler.plan(PROMPT, "syngen", steps=2, height=256, width=256, analysis=analysis)
    assert plan.method.step_size == 80.0 and any("scaled x4" in n for n in plan.notes)
    plan = sampler.plan(PROMPT, "syngen", steps=2, height=256, width=256, step_size=7.0, analysis=analysis)
    assert plan.method.step_size == 7.0 and not plan.notes


def test_the_update_is_taken_on_the_unet_input(pipe, analysis):
    """Under Euler the UNet sees z / sqrt(sigma^2 + 1): the step on z is alpha (sigma^2 + 1), so the papers'
    step sizes mean what they mean on SD's variance-preserving latents."""
    seen = []

    class Spy(GuidedSampler):
        def _descend(self, z, total, alpha, trace):
            seen.append(alpha)
            return super()._descend(z, total, alpha, trace)

    spy = Spy(pipe)
    spy(PROMPT, 0, "syngen", steps=2, runs=("guided",), decode=False, analysis=analysis)
    sigmas = pipe.scheduler.sigmas[:2].double()
    np.testing.assert_allclose(seen, (20.0 * (sigmas**2 + 1)).tolist(), rtol=1e-5)


def test_a_second_tokenizer_that_splits_differently_is_refused(pipe, sampler, analysis, monkeypatch):
    """The maps' keys are the first tokenizer's positions: a second tokenizer that shifts them fails clearly."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    backend = Tokenizer.from_str(pipe.tokenizer_2.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(
        single="<|startoftext|> <|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 49406), ("<|endoftext|>", 49407)],
    )
    shifted = type("Shifted", (), {"backend_tokenizer": backend})()
    monkeypatch.setattr(pipe, "tokenizer_2", shifted)
    with pytest.raises(ValueError, match=r"tokenizer 2 puts 'red' at position\(s\) \[3\], the analysis at \[2\]"):
        sampler(PROMPT, 0, "syngen", steps=2, analysis=analysis, decode=False)


def test_an_fp16_vae_decodes_in_fp32(pipe, sampler):
    """SDXL's VAE overflows in fp16: it decodes upcast and is fp16 again afterwards (its pipeline's force_upcast)."""
    seen = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    pipe.vae.to(torch.float16)
    try:
        image = sampler.decode(torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).half())
        assert seen == [torch.float32] and pipe.vae.dtype == torch.float16 and image.size == (128, 128)
    finally:
        hook.remove()
        pipe.vae.to(torch.float32)


@pytest.mark.slow  # about 20 s: CPU bf16 kernels are slow
def test_half_precision_unet_keeps_the_update_in_fp32():
    """bf16 on a CPU stands in for fp16 on CUDA: the UNet and both text encoders in half, loss and update fp32."""
    pipe = load_pipeline("tiny-sdxl", dtype=torch.bfloat16)
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.bfloat16}
    seen = set()

    class Spy(GuidedSampler):
        def _descend(self, z, total, alpha, trace):
            out = super()._descend(z, total, alpha, trace)
            seen.update({total.dtype, out.dtype})
            return out

    (r,) = Spy(pipe)(PROMPT, 0, "attend-excite", steps=2, decode=False)
    assert seen == {torch.float32} and r.settings["dtype"] == "bfloat16"
    assert np.isfinite(r.guided_latents).all() and np.abs(r.guided_latents - r.vanilla_latents).max() > 0.1


# -------------------------------------------------------------------------------- presets, app, serving


def test_sdxl_presets():
    from binding.architectures import ARCHITECTURES

    assert PRESETS["sdxl-base"].repo == "stabilityai/stable-diffusion-xl-base-1.0"
    assert PRESETS["sdxl-base"].family == PRESETS["tiny-sdxl"].family == PRESETS["arch:sdxl"].family == "sdxl"
    assert PRESETS["sdxl-base"].gpu_only and PRESETS["sdxl-base"].resolution == 1024
    assert not PRESETS["tiny-sdxl"].in_app and not PRESETS["arch:sdxl"].in_app
    assert ARCHITECTURES["sdxl"].pipeline == "sdxl"


def test_sdxl_architecture_has_the_published_sizes_and_reads_32x32_at_1024px():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from binding.architectures import ARCHITECTURES

    arch = ARCHITECTURES["sdxl"]
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**arch.unet), "vae": AutoencoderKL(**arch.vae),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.text_encoder)),
                  "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2))}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    for size, grid, fine in ((1024, (32, 32), (64, 64)), (512, (16, 16), (32, 32))):
        cap = AttentionCapture(models["unet"], size, size, 8, attributes=True)
        # 2 x 10 (down_blocks.2) + 10 (mid) + 3 x 10 (up_blocks.0) transformer layers at the read grid
        assert cap.grid == grid and len(cap.read_layers) == 60 and {l.heads for l in cap.read_layers} == {20}
        assert {l.grid for l in cap.attribute_layers} == {fine} and len(cap.attribute_layers) == 10


def test_sdxl_base_needs_a_gpu(monkeypatch):
    from binding import lab

    with pytest.raises(ModelLoadError, match="sdxl-base needs a CUDA GPU"):
        load_pipeline("sdxl-base", device="cpu")
    for env in (lab.PRESETS_ENV, "SPACE_ID", "SPACES_ZERO_GPU"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "sdxl-base" not in lab.allowed_models()
    monkeypatch.setenv(lab.PRESETS_ENV, "tiny,sdxl-base")
    with pytest.raises(ValueError, match="sdxl-base need"):
        lab.allowed_models()
    monkeypatch.delenv(lab.PRESETS_ENV)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert "sdxl-base" in lab.allowed_models()


def test_zerogpu_reservation_covers_sdxl():
    from binding.serving import Job, gpu_seconds

    methods = ("vanilla", "syngen", "divide-bind", "attend-excite")
    sd, xl = (gpu_seconds(Job(PROMPT, model, methods, steps=50)) for model in ("sd-1.4", "sdxl-base"))
    assert xl > 2 * sd and xl <= 600


def test_cli_generates_on_tiny_sdxl(tmp_path, capsys):
    from binding.cli import main

    assert main(["generate", PROMPT, "--model", "tiny-sdxl", "--method", "attend-excite", "--steps", "2",
                 "--out", str(tmp_path / "run")]) == 0
    r = load_run(tmp_path / "run")
    assert r.settings["family"] == "sdxl" and r.guided_image.size == (128, 128)
    assert main(["generate", PROMPT, "--model", "sdxl-base", "--device", "cpu", "--out", str(tmp_path / "x")]) != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bench_runs_on_tiny_sdxl():
    from binding.bench import format_report, run_benchmark

    report = run_benchmark("tiny-sdxl", steps=1, repeats=1, warmup=False, max_refinement=1)
    names = [r["name"] for r in report["rows"]]
    assert "diffusers attend-excite" not in names and "syngen" in names  # no diffusers A&E for SDXL
    assert report["settings"]["grid"] == [16, 16] and report["ae_vs_diffusers"] is None
    assert "diffusers SDXL (no maps)" in format_report(report)


def test_evaluation_and_overlaps_on_tiny_sdxl(runs, tmp_path):
    from binding.evaluation.report import write_report
    from binding.evaluation.runner import collect_rows, run_eval
    from binding.metrics import binding_overlaps

    r = runs["syngen"]
    overlaps = binding_overlaps(r.final_maps("guided").astype(np.float32), r.bindings, r.subjects)
    assert len(overlaps) == 2
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n", encoding="utf-8")
    done = run_eval(str(tmp_path / "prompts.txt"), tmp_path / "out", methods=["syngen"], seeds=[0], model="tiny-sdxl",
                    steps=2, clip="none", progress=False, log=lambda _: None)
    summary = write_report(done, log=lambda _: None)
    rows = collect_rows(tmp_path / "out")
    assert sorted(row["item"] for row in rows) == ["p0000-s0-syngen", "p0000-s0-vanilla"]
    assert summary["all"]["syngen"]["attn_leakage"]["paired_n"] == 1


def test_a_saved_sdxl_folder_loads_as_sdxl(pipe, tmp_path):
    """The real loading code (the hub preset goes through the same ``from_pretrained``), offline: a folder saved
    from an SDXL pipeline, its second tokenizer gone, comes back as SDXL with the shipped "!"-padding one."""
    import shutil

    pipe.save_pretrained(tmp_path / "xl", safe_serialization=True)
    shutil.rmtree(tmp_path / "xl" / "tokenizer_2")
    back = load_pipeline(str(tmp_path / "xl"))
    assert isinstance(back, StableDiffusionXLPipeline) and back.tokenizer_2.pad_token_id == 0
    assert torch.equal(back.unet.conv_in.weight, pipe.unet.conv_in.weight)
    (r,) = GuidedSampler(back)(PROMPT, 0, "vanilla", steps=2, decode=False)
    assert r.settings["family"] == "sdxl" and r.grid == (16, 16)
