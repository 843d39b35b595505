"""`python -m binding bench`: what guidance costs, measured side by side in one process.

Every configuration is warmed up once, then timed in interleaved rounds (vanilla, each method, diffusers'
pipelines, the unit cost, then again), so that drift in the machine's speed hits all of them alike; the
median of the rounds is reported. A method's *cost floor* is what no implementation can beat: the vanilla
run plus one conditional UNet forward and backward for every gradient pass the method actually made
(refinement iterations included), with the forward+backward measured here on the same model.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

DEFAULT_PROMPT = "a red apple and a green banana"


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
    """Peak memory of one call: CUDA's allocator statistics, or the process RSS sampled every 2 ms on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        proc = psutil.Process()
        self.base = proc.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss - self.base)
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
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
            out = pipe.unet(model_input, t, encoder_hidden_states=plan.cond_embeds, timestep_cond=plan.timestep_cond,
                            return_dict=False)[0]
            (grad,) = torch.autograd.grad(out.float().square().mean(), [z])
        return grad

    return run


def run_benchmark(model: str = "tiny", steps: int = 50, repeats: int = 3, prompt: str = DEFAULT_PROMPT, device=None) -> dict:
    """Measure and return ``{"settings", "rows", "unit_s", "capture_overhead"}``."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    from binding.analysis import analyze
    from binding.guidance import GuidedSampler
    from binding.methods import method_names
    from binding.models import load_pipeline

    pipe = load_pipeline(model, device=device)
    dev = pipe._execution_device
    sampler = GuidedSampler(pipe)
    analysis = analyze(prompt)
    subjects = list(analysis.nouns)
    token_indices = [w.token_indices[0] for w in subjects]
    ae_pipe = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in pipe.components.items() if k != "image_encoder"})
    ae_pipe.set_progress_bar_config(disable=True)
    plan = sampler.plan(prompt, "vanilla", steps=steps, seeds=[0])  # size, grid and embeddings, encoded once
    size, grid = plan.height, plan.grid

    def ours(method):
        def run():
            (r,) = sampler(prompt, 0, method, steps=steps, runs=("guided",) if method != "vanilla" else ("vanilla",),
                           decode=False, analysis=analysis, subjects=subjects)
            return r
        return run

    def diffusers_plain():
        g = torch.Generator("cpu").manual_seed(0)
        return pipe(prompt, num_inference_steps=steps, generator=g, output_type="latent", height=size, width=size)

    def diffusers_ae():
        # diffusers' A&E installs its own processors on the shared UNet and leaves them there: put ours back,
        # or every configuration timed after it would run A&E's explicit attention in every layer.
        processors = dict(pipe.unet.attn_processors)
        try:
            g = torch.Generator("cpu").manual_seed(0)
            return ae_pipe(prompt, token_indices=token_indices, num_inference_steps=steps, generator=g,
                           output_type="latent", height=size, width=size, max_iter_to_alter=25, attn_res=tuple(grid))
        finally:
            pipe.unet.set_attn_processor(processors)

    configs = {
        "diffusers SD (no maps)": diffusers_plain,
        "vanilla (maps captured)": ours("vanilla"),
        **{m: ours(m) for m in method_names(guided_only=True)},
        "diffusers attend-excite": diffusers_ae,
        "unit: cond. UNet fwd+bwd": unit_forward_backward(pipe, sampler, plan),
    }
    times = {k: [] for k in configs}
    mems = {k: 0.0 for k in configs}
    passes = {}
    for fn in configs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in configs.items():
            seconds, mem, out = _timed(fn, dev)
            times[name].append(seconds)
            mems[name] = max(mems[name], mem)
            if name in method_names(guided_only=True):
                passes[name] = int(out.counters["guided"]["grad_passes"])
    med = {k: statistics.median(v) for k, v in times.items()}
    unit = med["unit: cond. UNet fwd+bwd"]
    vanilla = med["vanilla (maps captured)"]
    rows = []
    for name in configs:
        row = Row(name, med[name], peak_mem_mb=mems[name])
        if name != "unit: cond. UNet fwd+bwd":
            row.vs_vanilla = med[name] / vanilla
        if name in method_names(guided_only=True):
            row.grad_passes = passes[name]
            row.floor_s = vanilla + passes[name] * unit
            row.vs_floor = med[name] / row.floor_s
        rows.append(row)
    return {
        "settings": {"model": model, "steps": steps, "repeats": repeats, "prompt": prompt, "size": size,
                     "grid": list(grid), "device": str(dev), "dtype": str(pipe.unet.dtype).replace("torch.", ""),
                     "threads": torch.get_num_threads(), "subject_token_indices": token_indices},
        "rows": [asdict(r) for r in rows],
        "unit_s": unit,
        "capture_overhead": vanilla / med["diffusers SD (no maps)"] - 1.0,
        "ae_vs_diffusers": med["attend-excite"] / med["diffusers attend-excite"],
    }


def format_report(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"model {s['model']} on {s['device']} ({s['dtype']}, {s['threads']} threads), {s['size']} px, grid "
        f"{s['grid'][0]}x{s['grid'][1]}, {s['steps']} steps, median of {s['repeats']} interleaved rounds",
        f"prompt: {s['prompt']!r}",
        "",
        f"{'configuration':28s} {'time s':>8s} {'x vanilla':>9s} {'grad passes':>11s} {'floor s':>8s} {'x floor':>8s} "
        f"{'peak MB':>8s}",
    ]

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for r in report["rows"]:
        lines.append(
            f"{r['name']:28s} {r['seconds']:8.3f} {f(r['vs_vanilla'], '9.2f')} {f(r['grad_passes'], '11d')} "
            f"{f(r['floor_s'], '8.3f')} {f(r['vs_floor'], '8.3f')} {f(r['peak_mem_mb'], '8.1f')}"
        )
    lines += [
        "",
        f"map capture in a vanilla run: {100 * report['capture_overhead']:+.1f}% over plain diffusers (goal < +10%)",
        f"our attend-excite / diffusers' attend-excite: {report['ae_vs_diffusers']:.2f}x (goal < 1)",
        "every method within 1.15x of its floor: "
        + ("yes" if all(r["vs_floor"] <= 1.15 for r in report["rows"] if r["vs_floor"] is not None) else "no"),
        "peak MB: "
        + ("CUDA memory allocated above the start of the call" if s["device"].startswith("cuda") else
           "growth of the process RSS above the start of the call (sampled every 2 ms); 0 = the call fitted in "
           "memory the process already held"),
    ]
    return "\n".join(lines)
