"""Model presets and loading: the offline tiny model, hub presets failing offline with instructions, folders."""

import shutil

import pytest
import torch

from binding import models
from binding.models import (
    PRESETS,
    ModelLoadError,
    build_tiny_pipeline,
    default_model,
    default_size,
    describe,
    load_pipeline,
    model_name,
    preset,
)


def test_presets_table_holds_the_facts():
    assert set(PRESETS) == {"shapes", "tiny", "sd-1.4", "sd-1.5", "sd-2.1-base", "arch:sd-1.5", "arch:sd-2.1-base",
                            "tiny-sdxl", "sdxl-base", "arch:sdxl"}
    assert PRESETS["sd-1.4"].repo == "CompVis/stable-diffusion-v1-4"
    assert PRESETS["sd-1.5"].repo == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert PRESETS["sd-2.1-base"].repo == "stabilityai/stable-diffusion-2-1-base"
    assert PRESETS["tiny"].offline and PRESETS["shapes"].offline and not PRESETS["sd-1.4"].offline
    assert [p.resolution for p in PRESETS.values()] == [64, 64, 512, 512, 512, 512, 512, 128, 1024, 1024]
    assert all(p.description for p in PRESETS.values())
    assert preset("SD-1.4") is PRESETS["sd-1.4"] and preset("nope") is None
    assert "CompVis/stable-diffusion-v1-4" in describe("sd-1.4") and "512" in describe("sd-1.4")
    assert "offline" in describe("tiny")
    assert "local" in describe("/some/folder")


def test_random_weight_architectures_are_offline_and_not_in_the_app(monkeypatch):
    from binding import lab
    from binding.architectures import ARCHITECTURES

    arch = [p for p in PRESETS.values() if p.builder == "arch"]
    assert {p.name for p in arch} == {"arch:sd-1.5", "arch:sd-2.1-base", "arch:sdxl"}
    assert all(p.offline and not p.in_app and p.architecture in ARCHITECTURES for p in arch)
    assert [n for n, p in PRESETS.items() if p.in_app] == ["shapes", "tiny", "sd-1.4", "sd-1.5", "sd-2.1-base",
                                                            "sdxl-base"]
    for env in (lab.PRESETS_ENV, "SPACE_ID", "SPACES_ZERO_GPU"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lab.allowed_models() == ["shapes", "tiny", "sd-1.4", "sd-1.5", "sd-2.1-base"]  # the app's menu (no GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lab.allowed_models()[-1] == "sdxl-base"  # SDXL only where there is a GPU
    monkeypatch.setenv("SPACE_ID", "user/space")  # a CPU Space offers the offline presets, still not these
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert lab.allowed_models() == ["shapes", "tiny"]
    assert "random weights" in describe("arch:sd-1.5") and "512 px" in describe("arch:sd-1.5")


def test_default_model_depends_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_model() == models.OFFLINE_DEFAULT == "shapes"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_model() == "sd-1.4"


def test_tiny_pipeline_is_ready_and_offline(tiny):
    assert tiny.safety_checker is None
    assert tiny._progress_bar_config.get("disable") is True
    assert tiny.device.type == "cpu" and tiny.unet.dtype == torch.float32
    cfg = tiny.scheduler.config
    assert type(tiny.scheduler).__name__ == "PNDMScheduler" and cfg.skip_prk_steps and cfg.steps_offset == 1
    assert tiny.tokenizer("a red apple").input_ids == [49406, 320, 736, 3055, 49407]
    assert tiny.text_encoder.config.vocab_size == 49408
    assert tiny.unet.config.block_out_channels == (32, 64) and tiny.unet.config.cross_attention_dim == 32
    assert default_size(tiny) == 64 and default_size("sd-2.1-base") == 512
    assert models.model_name(tiny) == "tiny"


def test_tiny_pipeline_tokenizer_is_its_own():
    # The pipeline pads to 77; a shared fast tokenizer would keep that padding and break prompt analysis.
    from binding.tokenizer import load_tokenizer

    assert load_pipeline("tiny").tokenizer is not load_tokenizer()


def test_tiny_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_pipeline()
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_pipeline()
    for model in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, model).state_dict(), getattr(b, model).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Pinned values: the same weights on every machine; a change in the construction shows up here.
    assert a.unet.conv_in.weight.double().sum().item() == pytest.approx(-2.0138784234950435, abs=1e-6)
    assert a.text_encoder.get_input_embeddings().weight[320].double().sum().item() == pytest.approx(
        0.11125238554086536, abs=1e-6
    )
    assert a.vae.decoder.conv_out.weight.double().sum().item() == pytest.approx(-1.048675991682103, abs=1e-6)
    c = build_tiny_pipeline(seed=1)
    assert not torch.equal(c.unet.conv_in.weight, a.unet.conv_in.weight)


def test_unknown_name_lists_the_presets():
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("stable-diffusion-9000")
    msg = str(err.value)
    assert "stable-diffusion-9000" in msg
    for name in PRESETS:
        assert name in msg
    assert "folder" in msg


def test_hub_preset_offline_says_how_to_get_it():
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("sd-1.4", local_files_only=True)
    msg = str(err.value)
    assert "huggingface-cli download CompVis/stable-diffusion-v1-4" in msg
    assert "--local-dir" in msg


def test_shapes_preset_is_the_shipped_teaching_model():
    pipe = load_pipeline("shapes")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert model_name(pipe) == "shapes" and default_size(pipe) == 64
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on its own latents, not SD's
    assert "assets/shapes" in describe("shapes")


def test_shapes_preset_without_weights_says_how_to_train(monkeypatch, tmp_path):
    from binding.shapes import model as shapes_model

    monkeypatch.setattr(shapes_model, "SHAPES_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="teach train"):
        load_pipeline("shapes")


def test_folder_without_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_local_folder_without_tokenizer_uses_the_shipped_one(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "tokenizer")
    pipe = load_pipeline(str(tmp_path / "ckpt"), device="cpu")
    assert pipe.tokenizer("a red apple").input_ids == [49406, 320, 736, 3055, 49407]
    assert models.model_name(pipe) == str(tmp_path / "ckpt")
    assert torch.equal(pipe.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert pipe.safety_checker is None


def test_a_shapes_folder_gets_the_shapes_defaults_and_another_folder_the_papers(tiny, tmp_path):
    """A fine-tune or training candidate given by its folder must not run at SD's 50 steps and step size 20."""
    from binding.models import SHAPES_DEFAULTS
    from binding.settings import defaults_for
    from binding.shapes.model import SHAPES_DIR

    shutil.copytree(SHAPES_DIR, tmp_path / "candidate")
    d = defaults_for(str(tmp_path / "candidate"), "divide-bind")
    assert d["steps"] == SHAPES_DEFAULTS["*"]["steps"] and d["step_size"] == SHAPES_DEFAULTS["divide-bind"]["step_size"]
    tiny.save_pretrained(tmp_path / "sd")
    assert defaults_for(str(tmp_path / "sd"), "syngen")["step_size"] == 20.0  # SynGen's paper value
    assert defaults_for(str(tmp_path / "sd"), "syngen")["steps"] == 50
