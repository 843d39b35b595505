"""The teaching model: its layout reads a 16x16 grid, training resumes bit for bit, the export is a diffusers
Stable Diffusion folder the guidance runs on, and the scoring statistics are right."""

import json
import math

import numpy as np
import pytest
import torch

from binding.attention import cross_attention_layers, read_grid
from binding.evaluation.report import shapes_rates
from binding.evaluation.stats import bootstrap_paired, newcombe_paired, wilson
from binding.guidance import GuidedSampler
from binding.shapes.model import ShapesConfig, build_models, build_shapes_pipeline
from binding.shapes.train import Trainer, train
from binding.tokenizer import load_tokenizer

PROMPT = "a red circle and a blue square"


def _quiet(_msg):
    pass


pytestmark = pytest.mark.slow  # trains models


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The micro model is latency-bound: one thread is as fast, and immune to OpenMP stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The micro model trained straight through (a) and stopped mid-diffusion then resumed (b)."""
    root = tmp_path_factory.mktemp("teach")
    cfg = ShapesConfig.micro()
    a = train(root / "a", cfg, device="cpu", log=_quiet)
    stopped = train(root / "b", cfg, device="cpu", max_steps=cfg.vae_steps + 1, log=_quiet)
    where = (stopped.phase, stopped.step)
    b = train(root / "b", cfg, device="cpu", log=_quiet)
    return a, b, where


@pytest.fixture(scope="module")
def pipe(runs):
    return build_shapes_pipeline(runs[0].out / "pipeline", device="cpu")


def test_default_model_reads_a_16x16_grid_like_sd():
    cfg = ShapesConfig()
    vae, unet, text_encoder = build_models(cfg)
    assert cfg.vae_factor == 4 and cfg.latent_size == 16
    assert read_grid(unet, 64, 64, cfg.vae_factor) == (16, 16)
    layers = cross_attention_layers(unet, 64, 64, cfg.vae_factor)
    read = [layer for layer in layers if layer.grid == (16, 16)]
    # SD 1.x reads 5 layers (2 down, 3 up) at its read grid; so does this model. The 8x8 mid block is not read.
    assert [layer.place for layer in read] == ["down", "down", "up", "up", "up"]
    assert [layer.grid for layer in layers if layer.place == "mid"] == [(8, 8)]
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in
         (("vae", vae), ("unet", unet), ("text", text_encoder))}
    assert n["vae"] < 1e6 and n["unet"] < 5e6 and n["text"] < 3.5e6
    assert 4 * sum(n.values()) < 36e6  # fp32 weights + 1.5 MB tokenizer stay under 40 MB


def test_training_runs_and_resumes_bit_for_bit(runs):
    a, b, where = runs
    cfg = a.cfg
    assert where == ("diffusion", 1)
    assert (a.phase, a.step) == (b.phase, b.step) == ("diffusion", cfg.steps)
    losses = [loss for _, loss in a.history["vae"] + a.history["diffusion"]]
    assert len(losses) == cfg.vae_steps + cfg.steps and all(math.isfinite(x) for x in losses)
    assert a.history == b.history
    sa, sb = a.state_dict(), b.state_dict()
    for name in ("vae", "unet", "text_encoder"):
        assert sa[name].keys() == sb[name].keys()
        assert all(torch.equal(sa[name][k], sb[name][k]) for k in sa[name]), name
    assert all(torch.equal(sa["ema"]["shadow"][k], sb["ema"]["shadow"][k]) for k in sa["ema"]["shadow"])
    assert sa["ema"]["updates"] == sb["ema"]["updates"] == cfg.steps
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(sa["generator"], sb["generator"])
    assert sa["scaling_factor"] == sb["scaling_factor"] > 0
    # only the newest checkpoints of the diffusion phase are kept; each holds the VAE too
    names = [p.name for p in a.checkpoints()]
    assert names == ["diffusion-0000002.pt", "diffusion-0000004.pt"]
    log = [json.loads(line) for line in (a.out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["phase"] == "diffusion" and log[-1]["step"] == cfg.steps


def test_resume_refuses_other_settings(runs):
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(runs[0].out, ShapesConfig.micro(batch_size=8), device="cpu", log=_quiet)
    longer = Trainer(runs[0].out, ShapesConfig.micro(steps=10), device="cpu", log=_quiet)
    assert longer.cfg.steps == 10  # a run may be extended


def test_export_is_a_stable_diffusion_folder(runs):
    from diffusers import StableDiffusionPipeline

    a = runs[0]
    folder = a.out / "pipeline"
    sd = StableDiffusionPipeline.from_pretrained(str(folder))
    cfg = sd.scheduler.config
    assert type(sd.scheduler).__name__ == "PNDMScheduler" and cfg.steps_offset == 1 and cfg.skip_prk_steps
    assert cfg.beta_schedule == "scaled_linear" and cfg.prediction_type == "epsilon"
    shipped = load_tokenizer.__wrapped__()  # a private instance: padding calls change a fast tokenizer
    for text in (PROMPT, "", "an orange star, a pink circle and a green triangle"):
        assert sd.tokenizer(text, padding="max_length", max_length=77).input_ids == shipped(
            text, padding="max_length", max_length=77
        ).input_ids
    assert sd.vae.config.scaling_factor == pytest.approx(a.scaling_factor)
    ema = a.ema.shadow
    assert all(torch.equal(p, ema[f"unet.{k}"]) for k, p in sd.unet.named_parameters())
    assert all(torch.equal(p, ema[f"text_encoder.{k}"]) for k, p in sd.text_encoder.named_parameters())
    assert not any(p.suffix == ".bin" for p in folder.rglob("*"))
    card = (folder / "README.md").read_text()
    assert "shapes" in card and "loss.png" in card and "cores" in card  # hardware named in the card
    from PIL import Image

    with Image.open(folder / "loss.png") as im:  # the loss curve the card shows
        assert im.format == "PNG" and im.size[0] > 400


def test_guided_sampler_runs_on_the_export(pipe, tmp_path):
    (r,) = GuidedSampler(pipe)(PROMPT, [0], "syngen", steps=2)
    assert r.grid == (16, 16) and r.guided_image.size == (64, 64) and r.vanilla_image.size == (64, 64)
    assert r.counters["guided"]["grad_passes"] > 0
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="teach train"):
        build_shapes_pipeline(tmp_path)


def test_score_from_an_eval_grid_reads_the_same_images(runs, tmp_path):
    from PIL import Image

    from binding.evaluation.report import picture_grid, rows_from_eval
    from binding.evaluation.runner import collect_rows, run_eval
    from binding.shapes.scorer import score_image
    from binding.shapes.world import parse_caption

    out = tmp_path / "eval"
    run_eval("shapes", out, methods=["syngen"], seeds=[0, 1], model=str(runs[0].out / "pipeline"), steps=2,
             clip="none", limit=2, progress=False, log=_quiet)
    rows = rows_from_eval(out)
    assert len(rows) == 2 * 2 * 2 and {r["group"] for r in rows} == {"unseen"}
    by_key = {(r["method"], r["prompt"], r["seed"]): r for r in rows}
    for rec in collect_rows(out):  # each verdict is the scorer's on that item's own image
        side = "vanilla" if rec["method"] == "vanilla" else "guided"
        with Image.open(out / "items" / rec["item"] / "run" / f"{side}.png") as im:
            s = score_image(im.convert("RGB"), parse_caption(rec["prompt"]))
        r = by_key[(rec["method"], rec["prompt"], rec["seed"])]
        assert (r["present_all"], r["bound_all"], r["leak_any"]) == (s["present_all"], s["bound_all"], s["leak_any"])
    entry = shapes_rates(rows, ["vanilla", "syngen"])["all"]["syngen"]
    assert entry["n"] == entry["paired_n"] == 4
    grid = picture_grid(out, [0, 1], [0, 1], ["vanilla", "syngen"])
    one = picture_grid(out, [0], [0, 1], ["vanilla", "syngen"])
    assert grid.width == one.width and grid.height > 2 * one.height - 20
    with pytest.raises(ValueError, match="eval --set shapes"):
        rows_from_eval(tmp_path / "empty")
    from binding.cli import main

    assert main(["teach", "score", "--from-eval", str(out), "--grid", str(tmp_path / "g.png"), "--grid-prompts", "0-1"]) == 0
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == grid.size
    assert main(["teach", "score", "--from-eval", str(tmp_path / "empty")]) == 2


def test_wilson_interval():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(0, 0) == (0.0, 1.0)


def test_newcombe_paired_interval():
    # Concordant pairs only: no difference and a narrow interval, narrower than if the pairs were unrelated.
    diff, lo, hi = newcombe_paired(40, 0, 0, 60)
    assert diff == 0 and lo < 0 < hi and hi - lo < 0.1
    # Swapping the discordant counts mirrors the interval.
    d1, l1, h1 = newcombe_paired(30, 15, 5, 50)
    d2, l2, h2 = newcombe_paired(30, 5, 15, 50)
    assert d1 == pytest.approx(0.1) and d2 == pytest.approx(-0.1)
    assert (l1, h1) == (pytest.approx(-h2), pytest.approx(-l2))
    assert l1 < d1 < h1 and l1 > 0  # 15 vs 5 discordant pairs out of 100: a real difference
    # 20 discordant pairs, all for the method: Newcombe's method 10 from the two Wilson intervals by hand
    # (p1 = 1: [0.83887, 1]; p2 = 0: [0, 0.16113]; phi = 0): lower 1 - sqrt(0.16113^2 + 0.16113^2)
    assert newcombe_paired(0, 20, 0, 0) == (1.0, pytest.approx(0.772135, abs=1e-6), 1.0)
    d, lo, hi = newcombe_paired(10, 3, 3, 10)
    assert d == 0 and -1 <= lo < 0 < hi <= 1


def test_prompt_bootstrap_and_summary():
    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(10), 8)
    vanilla = rng.random(80) < 0.3
    guided = vanilla | (rng.random(80) < 0.3)
    lo, hi = bootstrap_paired(guided, vanilla, prompts)
    assert lo <= (guided.mean() - vanilla.mean()) <= hi and 0 <= lo
    assert (lo, hi) == bootstrap_paired(guided, vanilla, prompts)
    rows = [
        {"method": m, "prompt": f"p{p}", "group": "seen", "seed": i, "present_all": True,
         "bound_all": bool(x), "leak_any": not x}
        for m, xs in (("vanilla", vanilla), ("syngen", guided))
        for i, (p, x) in enumerate(zip(prompts, xs))
    ]
    s = shapes_rates(rows)
    e = s["seen"]["syngen"]["bound_all"]
    assert e["rate"] == pytest.approx(guided.mean()) and e["vs_vanilla"]["diff"] == pytest.approx(
        guided.mean() - vanilla.mean()
    )
    assert e["vs_vanilla"]["only_baseline"] == 0 and e["vs_vanilla"]["bootstrap_ci"] == [lo, hi]
    assert s["all"]["vanilla"]["present_all"]["rate"] == 1.0


def test_cli_commands_parse():
    from binding.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["teach", "train", "--out", "runs/shapes", "--max-minutes", "30", "--threads", "1",
                              "--ground-nouns", "0.25", "--no-blank-padding", "--init-from", "assets/shapes"])
    assert args.out == "runs/shapes" and args.max_minutes == 30 and args.func.__name__ == "cmd_teach_train"
    assert args.ground_nouns == 0.25 and args.blank_padding is False and args.init_from == "assets/shapes"
    assert args.lr is None  # left out: the stored or default recipe decides
    args = parser.parse_args(["teach", "score", "--seeds", "0-2", "--methods", "vanilla,SynGen,a&e"])
    assert args.seeds == [0, 1, 2] and args.methods == ["vanilla", "syngen", "attend-excite"] and args.model == "shapes"
    args = parser.parse_args(["teach", "export", "--run", "runs/shapes", "--to", "assets/shapes"])
    assert args.to == "assets/shapes"


def test_check_scorer_prints_each_condition_and_the_vae_ceiling(capsys):
    from binding.cli import main

    assert main(["teach", "check-scorer", "--n", "20", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    clean = next(line for line in out.splitlines() if line.startswith("clean"))
    assert "100.0%" in clean  # ground truth is read perfectly
    assert "tiny VAE round trip" in out  # a random VAE: far from perfect, and shown as such
    assert "blur1.5" in out and "resample" in out


def test_colour_blind_encoding_hides_only_the_colour_words():
    """The premise of ``isolate_colours``: with the colour words masked out of the encoder's attention, every other
    position reads the same whatever the colours, and the colour words' own rows still differ."""
    from binding.shapes import world
    from binding.shapes.train import colour_blind_encoding

    tok = load_tokenizer.__wrapped__()
    _, _, text_encoder = build_models(ShapesConfig.micro())
    ids = torch.tensor([tok(c, padding="max_length", max_length=77).input_ids
                        for c in (PROMPT, "a green circle and a yellow square")])
    colour_ids = torch.tensor([tok.convert_tokens_to_ids(c + "</w>") for c in world.COLOURS])
    with torch.no_grad():
        colour, blind = colour_blind_encoding(text_encoder, ids, colour_ids)
        full = text_encoder(ids)[0]
    assert colour[0].nonzero().flatten().tolist() == [2, 6]
    others = ~colour[0]
    assert torch.allclose(blind[0, others], blind[1, others], atol=1e-5)
    assert not torch.allclose(full[0, 3], full[1, 3], atol=1e-3)  # unmasked, "circle" carries its colour
    assert not torch.allclose(blind[0, 2], blind[1, 2], atol=1e-3)


def test_isolating_colours_fine_tunes_and_the_card_keeps_its_lineage(runs, tmp_path):
    base = runs[0].out / "pipeline"
    cfg = ShapesConfig.micro(init_from=str(base), isolate_colours=True, isolate_weight=1.0)
    tr = train(tmp_path / "iso", cfg, device="cpu", log=_quiet)
    log = [json.loads(line) for line in (tr.out / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["isolate"]) for row in log if row["phase"] == "diffusion")
    card = (tr.out / "pipeline" / "README.md").read_text()
    assert "`isolate_colours`: on" in card and "`isolate_weight`: weight 1.0" in card
    assert f"## Base model (`{base}`)" in card and "### " in card  # the base's card, one level down
    # a stored config from before the option reads as trained then: off
    stored = json.loads((runs[0].out / "config.json").read_text())["config"]
    stored.pop("isolate_colours"), stored.pop("isolate_weight")
    assert not ShapesConfig.from_dict(stored).isolate_colours
