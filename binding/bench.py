"""`python -m binding bench`: what guidance costs, measured side by side in one process; and the GPU check.

Every configuration is warmed up once, then timed in interleaved rounds (vanilla, each method, diffusers'
pipelines, the unit cost, then again), so that drift in the machine's speed hits all of them alike; the
median of the rounds is reported. A method's *cost floor* is what no implementation can beat: the vanilla
run plus one conditional UNet forward and backward for every gradient pass the method actually made
(refinement iterations included), with the forward+backward measured here on the same model.

Real scale without weights: the ``arch:*`` presets are SD 1.5 / SD 2.1-base with random weights
(``binding.architectures``), so ``--model arch:sd-1.5 --size 512`` measures what a 512 px SD 1.5 run costs.
Random maps rarely meet a refinement threshold, so a refinement runs to its cap; ``max_refinement`` lowers
the caps of every method (diffusers' Attend-and-Excite alike) to keep a CPU run short. The floor counts the
passes made, so the ratios to the floor stay honest; the ratios to vanilla describe the capped methods.

``gpu_check`` is the one-command check for a GPU machine (``bench --gpu-check``): SD 1.5's architecture at
512 px with an fp16 UNet, every method, a short probe that fails on the first NaN or dtype error, the bench
table with each method's peak CUDA memory, and each generation's time against the app's ZeroGPU
reservation (``binding.serving.gpu_seconds``). ``dry_run=True`` runs the same path on ``tiny`` on the CPU.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

DEFAULT_PROMPT = "a red apple and a green banana"
FLOOR_GOAL = 1.15  # every method within this factor of its cost floor
PLAIN_ROW = {"sd": "diffusers SD (no maps)", "sdxl": "diffusers SDXL (no maps)"}  # the family's own pipeline


@dataclass
class Row:
    name: str
    seconds: float
    vs_vanilla: float | None = None  # time / our vanilla run's time
    vs_floor: float | None = None  # time / the method's cost floor
    grad_passes: int | None = None
    floor_s: float | None = None
    peak_mem_mb: float | None = None


class _PeakMemory:
    """Peak memory of one call: CUDA's ``max_memory_allocated`` (weights included), or on a CPU the process
    RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        proc = psutil.Process()
        self.peak = proc.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        return False


def _timed(fn, device: torch.device) -> tuple[float, float, object]:
    with _PeakMemory(device) as mem:
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, mem.peak / 2**20, out


def _latents_of(out) -> torch.Tensor | None:
    """The final latents of a configuration's output (ours, diffusers', or the unit's gradient)."""
    if isinstance(out, torch.Tensor):
        return out
    images = getattr(out, "images", None)
    if isinstance(images, torch.Tensor):
        return images
    latents = getattr(out, "guided_latents", None)
    if latents is None:
        latents = getattr(out, "vanilla_latents", None)
    return None if latents is None else torch.as_tensor(latents)


def _check_finite(name: str, out) -> None:
    from binding.guidance import GuidanceError

    latents = _latents_of(out)
    if latents is not None and not torch.isfinite(latents).all():
        raise GuidanceError(f"{name} produced NaN/inf values")


def unit_forward_backward(pipe, sampler, plan, seed: int = 0):
    """A closure running one conditional UNet forward and backward w.r.t. the latents (the floor's unit)."""
    from binding.guidance import _parameters_frozen

    latents, _ = sampler.prepare_latents(plan, seed)
    pipe.scheduler.set_timesteps(plan.steps)
    t = pipe.scheduler.timesteps[0]

    def run():
        # As the guidance runs it (batch 1, parameters frozen, fp32 latents), but the whole UNet, on its own processors.
        z = latents.detach().float().requires_grad_(True)
        with _parameters_frozen(pipe.unet), torch.enable_grad():
            model_input = pipe.scheduler.scale_model_input(z, t).to(pipe.unet.dtype)
            out = pipe.unet(model_input, t, **plan.unet_inputs(cond_only=True), return_dict=False)[0]
            (grad,) = torch.autograd.grad(out.float().square().mean(), [z])
        return grad

    return run


def capped(method, cap: int | None):
    """``method`` with its refinement caps lowered to ``cap`` (None: as it is)."""
    if cap is None or method.refinement is None:
        return method
    return dataclasses.replace(method, max_refinement=min(method.max_refinement, cap),
                               first_max_refinement=min(method.refinement_cap(0), cap))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def run_benchmark(model: str = "tiny", steps: int = 50, repeats: int = 3, prompt: str = DEFAULT_PROMPT, device=None,
                  *, size: int | None = None, dtype: torch.dtype | None = None, warmup: bool = True,
                  max_refinement: int | None = None, diffusers_ae: bool = True, pipe=None) -> dict:
    """Measure and return ``{"settings", "rows", "unit_s", "capture_overhead", "ae_vs_diffusers"}``.

    ``size``: image side (default: the model's). ``dtype``: the pipeline's (default: fp16 on CUDA, fp32 on a
    CPU). ``warmup=False`` skips the per-configuration warm-up (one unit pass still warms the process up):
    at 512 px on a CPU a pass takes tens of seconds and first-call costs vanish in it. ``max_refinement``: see
    the module docstring. ``diffusers_ae=False`` leaves diffusers' Attend-and-Excite out (it materialises
    every layer's attention: about 9 GB at 512 px in fp32). ``pipe``: an already loaded pipeline of ``model``.
    Every output is checked for NaN/inf (``GuidanceError``).
    """
    from binding.analysis import analyze
    from binding.guidance import GuidedSampler
    from binding.methods import METHODS, method_names
    from binding.models import load_pipeline

    if pipe is None:
        pipe = load_pipeline(model, device=device, dtype=dtype)
    dev = pipe._execution_device
    sampler = GuidedSampler(pipe)
    analysis = analyze(prompt)
    subjects = list(analysis.nouns)
    token_indices = [w.token_indices[0] for w in subjects]
    plan = sampler.plan(prompt, "vanilla", steps=steps, seeds=[0], height=size, width=size)  # encoded once
    size, grid = plan.height, plan.grid
    guided = method_names(guided_only=True)
    diffusers_ae = diffusers_ae and sampler.family == "sd"  # diffusers has no Attend-and-Excite for SDXL
    plain = PLAIN_ROW[sampler.family]

    def ours(method):
        m = capped(METHODS[method], max_refinement)

        def run():
            (r,) = sampler(prompt, 0, m, steps=steps, runs=("guided",) if m.terms else ("vanilla",), decode=False,
                           analysis=analysis, subjects=subjects, height=size, width=size)
            return r
        return run

    def diffusers_plain():
        g = torch.Generator("cpu").manual_seed(0)
        return pipe(prompt, num_inference_steps=steps, generator=g, output_type="latent", height=size, width=size)

    configs = {
        plain: diffusers_plain,
        "vanilla (maps captured)": ours("vanilla"),
        **{m: ours(m) for m in guided},
    }
    if diffusers_ae:
        configs["diffusers attend-excite"] = _diffusers_ae(pipe, prompt, token_indices, steps, size, grid,
                                                           max_refinement)
    configs["unit: cond. UNet fwd+bwd"] = unit_forward_backward(pipe, sampler, plan)

    times = {k: [] for k in configs}
    mems = {k: 0.0 for k in configs}
    passes = {}
    for name, fn in configs.items() if warmup else [("unit: cond. UNet fwd+bwd", configs["unit: cond. UNet fwd+bwd"])]:
        _check_finite(name, fn())
    for _ in range(repeats):
        for name, fn in configs.items():
            seconds, mem, out = _timed(fn, dev)
            _check_finite(name, out)
            times[name].append(seconds)
            mems[name] = max(mems[name], mem)
            if name in guided:
                passes[name] = int(out.counters["guided"]["grad_passes"])
    med = {k: statistics.median(v) for k, v in times.items()}
    unit = med["unit: cond. UNet fwd+bwd"]
    vanilla = med["vanilla (maps captured)"]
    rows = []
    for name in configs:
        row = Row(name, med[name], peak_mem_mb=mems[name])
        if name != "unit: cond. UNet fwd+bwd":
            row.vs_vanilla = med[name] / vanilla
        if name in guided:
            row.grad_passes = passes[name]
            row.floor_s = vanilla + passes[name] * unit
            row.vs_floor = med[name] / row.floor_s
        rows.append(row)
    return {
        "settings": {"model": model, "steps": steps, "repeats": repeats, "warmup": warmup, "prompt": prompt,
                     "size": size, "grid": list(grid), "device": str(dev), "device_name": _device_name(dev),
                     "dtype": str(pipe.unet.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                     "max_refinement": max_refinement, "subject_token_indices": token_indices,
                     "torch": torch.__version__},
        "rows": [asdict(r) for r in rows],
        "unit_s": unit,
        "capture_overhead": vanilla / med[plain] - 1.0,
        "ae_vs_diffusers": med["attend-excite"] / med["diffusers attend-excite"] if diffusers_ae else None,
    }


def _diffusers_ae(pipe, prompt, token_indices, steps, size, grid, max_refinement):
    """diffusers' ``StableDiffusionAttendAndExcitePipeline`` on the same components, as a closure."""
    import functools

    from diffusers import StableDiffusionAttendAndExcitePipeline

    ae_pipe = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in pipe.components.items() if k != "image_encoder"})
    ae_pipe.set_progress_bar_config(disable=True)
    if max_refinement is not None:  # its cap is an argument its __call__ never passes: bind it on the instance
        ae_pipe._perform_iterative_refinement_step = functools.partial(
            type(ae_pipe)._perform_iterative_refinement_step, ae_pipe, max_refinement_steps=max_refinement)

    def run():
        # diffusers' A&E installs its own processors on the shared UNet and leaves them there: put ours back,
        # or every configuration timed after it would run A&E's explicit attention in every layer.
        processors = dict(pipe.unet.attn_processors)
        try:
            g = torch.Generator("cpu").manual_seed(0)
            return ae_pipe(prompt, token_indices=token_indices, num_inference_steps=steps, generator=g,
                           output_type="latent", height=size, width=size, max_iter_to_alter=25, attn_res=tuple(grid))
        finally:
            pipe.unet.set_attn_processor(processors)

    return run


def within_goal(report: dict) -> bool:
    return all(r["vs_floor"] <= FLOOR_GOAL for r in report["rows"] if r["vs_floor"] is not None)


def format_report(report: dict) -> str:
    s = report["settings"]
    device = s["device"] if s["device_name"] == s["device"] else f"{s['device']} ({s['device_name']})"
    lines = [
        f"model {s['model']} on {device} ({s['dtype']}, {s['threads']} threads, torch {s['torch']}), {s['size']} px, "
        f"grid {s['grid'][0]}x{s['grid'][1]}, {s['steps']} steps, median of {s['repeats']} interleaved round(s)"
        + ("" if s["warmup"] else ", no warm-up"),
        f"prompt: {s['prompt']!r}",
    ]
    if s["max_refinement"] is not None:
        lines.append(f"refinement capped at {s['max_refinement']} iterations per step (diffusers' A&E alike); the "
                     "floor counts the passes made")
    lines += [
        "",
        f"{'configuration':28s} {'time s':>8s} {'x vanilla':>9s} {'grad passes':>11s} {'floor s':>8s} {'x floor':>8s} "
        f"{'peak MB':>8s}",
    ]

    def f(v, fmt):
        return format(v, fmt) if v is not None else format("-", ">" + fmt.split(".")[0].rstrip("df"))

    for r in report["rows"]:
        lines.append(
            f"{r['name']:28s} {r['seconds']:8.3f} {f(r['vs_vanilla'], '9.2f')} {f(r['grad_passes'], '11d')} "
            f"{f(r['floor_s'], '8.3f')} {f(r['vs_floor'], '8.3f')} {f(r['peak_mem_mb'], '8.1f')}"
        )
    lines += ["", f"map capture in a vanilla run: {100 * report['capture_overhead']:+.1f}% over plain diffusers "
                  "(goal < +10%)"]
    if report["ae_vs_diffusers"] is not None:
        lines.append(f"our attend-excite / diffusers' attend-excite: {report['ae_vs_diffusers']:.2f}x (goal < 1)")
    lines += [
        f"every method within {FLOOR_GOAL}x of its floor: " + ("yes" if within_goal(report) else "no"),
        "peak MB: " + ("torch.cuda.max_memory_allocated during the call (weights included)"
                       if s["device"].startswith("cuda") else
                       "the process's peak RSS during the call (sampled every 2 ms; weights, libraries and memory "
                       "kept from earlier calls included)"),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- GPU check

GPU_CHECK = dict(model="arch:sd-1.5", size=512, steps=50, device="cuda", dtype=torch.float16)
# The same path on a CPU: tiny, bf16 standing in for fp16 (CPU fp16 kernels are slow; the slow tier runs them).
GPU_CHECK_DRY_RUN = dict(model="tiny", size=64, steps=3, device="cpu", dtype=torch.bfloat16)
PROBE_STEPS = 2  # PNDM: 3 loop indices, the first with its refinement


class CheckFailed(RuntimeError):
    """The GPU check found a NaN, a dtype error or a missing device; the message says where."""


def _probe(pipe, method: str, steps: int, prompt: str, size: int) -> dict:
    """One guided run of ``method`` that records the dtypes the UNet, the loss and the update ran in."""
    from binding.guidance import GuidanceError, GuidedSampler

    seen = {"unet input": set(), "loss": set(), "update": set()}

    class Probe(GuidedSampler):
        def _descend(self, z, total, alpha, trace):
            seen["loss"].add(total.dtype)
            out = super()._descend(z, total, alpha, trace)
            seen["update"].add(out.dtype)
            return out

    hook = pipe.unet.register_forward_pre_hook(lambda mod, args, kwargs: seen["unet input"].add(
        (args[0] if args else kwargs["sample"]).dtype), with_kwargs=True)
    try:
        (r,) = Probe(pipe)(prompt, 0, method, steps=steps, runs=("guided",), decode=False, height=size, width=size)
    finally:
        hook.remove()
    before = [v for values in r.losses.get("guided_before_update", {}).values() for v in values if v is not None]
    if not all(torch.isfinite(torch.tensor(before)).tolist()):
        raise GuidanceError(f"{method}: a loss was NaN/inf before an update")
    if not seen["loss"]:
        raise CheckFailed(f"{method}: no guidance update ran in {steps} steps")
    bad = {k: v for k, v in seen.items() if k != "unet input" and v != {torch.float32}}
    if bad or seen["unet input"] != {pipe.unet.dtype}:
        raise CheckFailed(f"{method}: dtypes {({k: sorted(map(str, v)) for k, v in seen.items()})}; the UNet must run "
                          f"in {pipe.unet.dtype} and the loss and update in torch.float32")
    return {k: sorted(str(d).replace("torch.", "") for d in v) for k, v in seen.items()}


def gpu_check(dry_run: bool = False, steps: int | None = None, log=print, **overrides) -> dict:
    """Run the GPU check (see the module docstring); raise ``CheckFailed``/``GuidanceError`` on a failure.

    Returns ``{"settings", "probes", "bench", "generations", "seconds"}``; ``log`` gets each stage as it ends.
    """
    from binding.methods import method_names
    from binding.models import load_pipeline
    from binding.serving import Job, gpu_seconds

    cfg = {**(GPU_CHECK_DRY_RUN if dry_run else GPU_CHECK), **overrides}
    if steps is not None:
        cfg["steps"] = steps
    start = time.perf_counter()
    if torch.device(cfg["device"]).type == "cuda" and not torch.cuda.is_available():
        raise CheckFailed("no CUDA device here: run the GPU check on a GPU machine, or `bench --gpu-check --dry-run` "
                          "for its CPU path on tiny")
    pipe = load_pipeline(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
    if pipe.unet.dtype != cfg["dtype"]:
        raise CheckFailed(f"the UNet loaded in {pipe.unet.dtype}, not {cfg['dtype']}")
    log(f"loaded {cfg['model']} on {cfg['device']} in {cfg['dtype']} ({time.perf_counter() - start:.1f} s)")

    probes = {}
    for m in method_names(guided_only=True):
        t = time.perf_counter()
        probes[m] = _probe(pipe, m, PROBE_STEPS, DEFAULT_PROMPT, cfg["size"])
        log(f"probe {m}: finite; UNet {probes[m]['unet input']}, loss {probes[m]['loss']}, update "
            f"{probes[m]['update']} ({time.perf_counter() - t:.1f} s)")

    bench = run_benchmark(cfg["model"], steps=cfg["steps"], repeats=1, pipe=pipe, size=cfg["size"])
    log(format_report(bench))

    # A generation in the app is a vanilla run, a guided run and two decodes, inside one ZeroGPU reservation.
    from binding.guidance import GuidedSampler

    sampler = GuidedSampler(pipe)
    latents = sampler.prepare_latents(sampler.plan(DEFAULT_PROMPT, "vanilla", steps=1, height=cfg["size"],
                                                   width=cfg["size"]), 0)[0]
    sampler.decode(latents)  # warm-up
    decode_s, _, _ = _timed(lambda: sampler.decode(latents), pipe._execution_device)
    rows = {r["name"]: r for r in bench["rows"]}
    generations = {}
    for m in method_names(guided_only=True):
        job = Job(DEFAULT_PROMPT, cfg["model"], ("vanilla", m), steps=cfg["steps"])
        seconds = rows["vanilla (maps captured)"]["seconds"] + rows[m]["seconds"] + 2 * decode_s
        generations[m] = {"seconds": seconds, "reserved_s": gpu_seconds(job), "peak_mem_mb": rows[m]["peak_mem_mb"]}
    return {"settings": {**{k: str(v) for k, v in cfg.items()}, "dry_run": dry_run}, "probes": probes,
            "bench": bench, "decode_s": decode_s, "generations": generations, "seconds": time.perf_counter() - start}


def format_generations(check: dict) -> str:
    lines = [f"{'one generation (vanilla + guided + 2 decodes)':46s} {'time s':>8s} {'ZeroGPU s':>9s} {'ratio':>6s} "
             f"{'peak MB':>8s}"]
    for m, g in check["generations"].items():
        lines.append(f"{m:46s} {g['seconds']:8.2f} {g['reserved_s']:9d} {g['seconds'] / g['reserved_s']:6.2f} "
                     f"{g['peak_mem_mb']:8.1f}")
    over = [m for m, g in check["generations"].items() if g["seconds"] > g["reserved_s"]]
    lines.append("ZeroGPU reservation (binding.serving.gpu_seconds, sized for a shared A100) long enough for every method: "
                 + ("yes" if not over else f"NO: {', '.join(over)} ran longer"))
    if check["settings"]["dry_run"]:
        lines.append("dry run: tiny on a CPU; these figures say nothing about a GPU")
    return "\n".join(lines)
