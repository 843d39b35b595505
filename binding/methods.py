"""The registries: every loss term and every method, in one place.

A **term** is one loss on the cross-attention maps: its name, the label people see, what in the prompt it
works on (bindings, subjects or subject-attribute pairs), and how it is computed from one pass's maps. Terms
that meet inside one expression (Divide & Bind's attendance and binding share a max over objects) form a
*group*, computed once with the set of its terms that are on. A **method** is a preset built from terms: its
step-size schedule, intervention steps and refinement (``binding/METHODS.md`` says where each default comes from).

Everything else reads these tables: the sampler computes the terms of a method through ``compute_terms``, the
CLI's and the app's choices, the benchmark's and the evaluation's method lists come from ``METHODS`` and
``TERMS``. Adding a term is a ``Term`` row (and its pure loss in ``binding.losses``); adding a method is a
``Method`` row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from binding.losses import (
    attend_excite_loss,
    db_attribute_maps,
    db_object_maps,
    divide_bind_loss,
    syngen_loss,
)

__all__ = [
    "METHODS",
    "PAPERS",
    "REFINEMENTS",
    "TERMS",
    "Method",
    "Term",
    "compute_terms",
    "custom_method",
    "method_names",
    "resolve_method",
]

# ------------------------------------------------------------------------------------------- terms


@dataclass(frozen=True)
class Term:
    """One loss term; ``group`` names the terms computed together (see the module docstring)."""

    name: str
    label: str  # what the app's checkbox says
    needs: str  # "bindings", "subjects" or "pairs": what must exist in the prompt for the term to act
    group: str
    family: str  # the method whose paper defines it


def _syngen(plan, rec, i: int, active: frozenset) -> tuple[dict, dict]:
    maps = rec.maps()
    parts = {}
    for name, positive in (("syngen_positive", True), ("syngen_negative", False)):
        if name in active:
            parts[name] = syngen_loss(maps, plan.binding_positions(), plan.n_tokens, positive=positive,
                                      negative=not positive)
    return parts, {}


def _attend_excite(plan, rec, i: int, active: frozenset) -> tuple[dict, dict]:
    loss, peaks = attend_excite_loss(rec.maps(), plan.subject_positions())
    return {"ae_excite": loss}, {"ae_min_peak": peaks.min()}


def _divide_bind(plan, rec, i: int, active: frozenset) -> tuple[dict, dict]:
    maps = rec.maps()
    objects = db_object_maps(maps, plan.subject_positions())
    attrs = None
    if plan.wants_attributes:
        fine = rec.attribute_maps()
        attrs = db_attribute_maps([fine if fine is not None else maps], plan.attribute_positions(), plan.grid)
    loss, tvs = divide_bind_loss(
        objects, attrs, plan.pairs if plan.wants_attributes else [], i,
        attendance="db_attendance" in active, binding="db_binding" in active,
        tv=plan.method.option("tv", "true"),
    )
    return {"divide_bind": loss}, {"db_min_tv": tvs.min()}


_GROUPS: dict[str, Callable] = {"syngen": _syngen, "divide_bind": _divide_bind, "attend_excite": _attend_excite}

TERMS: dict[str, Term] = {
    t.name: t
    for t in (
        Term("syngen_positive", "SynGen positive (modifier ↔ its noun)", "bindings", "syngen", "syngen"),
        Term("syngen_negative", "SynGen negative (away from other words)", "bindings", "syngen", "syngen"),
        Term("db_attendance", "D&B attendance (total variation)", "subjects", "divide_bind", "divide-bind"),
        Term("db_binding", "D&B binding (JSD attribute ↔ object)", "pairs", "divide_bind", "divide-bind"),
        Term("ae_excite", "A&E excite (weakest subject's peak)", "subjects", "attend_excite", "attend-excite"),
    )
}
# What a missing target means, per ``Term.needs``: the note a run shows when a term has nothing to act on.
NEEDS_NOTE = {
    "bindings": "there is no binding (no noun with a modifier)",
    "subjects": "there is no subject (no noun)",
    "pairs": "no subject has a modifier",
}
# The diagnostics the refinements read; never plotted as losses.
DIAGNOSTICS = ("ae_min_peak", "db_min_tv")


def compute_terms(plan, rec, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(total, per-term or per-group losses, diagnostics) of ``plan``'s active terms on one pass's maps."""
    active = frozenset(plan.terms)
    parts: dict[str, torch.Tensor] = {}
    diag: dict[str, torch.Tensor] = {}
    for group, fn in _GROUPS.items():
        mine = frozenset(t for t in active if TERMS[t].group == group)
        if mine:
            p, d = fn(plan, rec, i, mine)
            parts.update(p)
            diag.update(d)
    values = list(parts.values())
    total = values[0] if len(values) == 1 else torch.stack(values).sum()
    return total, parts, diag


# ------------------------------------------------------------------------------------- refinements

# Refinement tests: (parts, diagnostics, threshold) -> True while the threshold is unmet.
REFINEMENTS: dict[str, Callable[[Mapping, Mapping, float], bool]] = {
    # A&E: the weakest subject's smoothed peak is below the threshold (the loss is 1 - that peak)
    "ae-peak": lambda parts, diag, thr: "ae_excite" in parts and bool(parts["ae_excite"] > 1.0 - thr),
    # D&B: the smallest object total variation is below the threshold
    "db-tv": lambda parts, diag, thr: "db_min_tv" in diag and bool(diag["db_min_tv"] < thr),
}

# ----------------------------------------------------------------------------------------- methods

PAPERS = {
    "syngen": ("Linguistic Binding in Diffusion Models (SynGen), Rassin et al., NeurIPS 2023",
               "https://arxiv.org/abs/2306.08877"),
    "divide-bind": ("Divide & Bind Your Attention, Li et al., BMVC 2023", "https://arxiv.org/abs/2307.10864"),
    "attend-excite": ("Attend-and-Excite, Chefer et al., SIGGRAPH 2023", "https://arxiv.org/abs/2301.13826"),
}


@dataclass(frozen=True)
class Method:
    """How one method guides: its loss terms, step sizes and refinement (``binding/METHODS.md``)."""

    name: str
    terms: frozenset[str]
    label: str = ""  # what people see
    step_size: float = 20.0
    schedule: str = "constant"  # "constant", or "sqrt-decay": step_size * sqrt(linspace(1, 0.5, n_loop_steps))
    intervention_steps: int = 25  # a gradient step at every loop index i < this
    refinement: str | None = None  # a key of REFINEMENTS, or None
    thresholds: tuple[tuple[int, float], ...] = ()  # (loop index, threshold): refine there while unmet
    max_refinement: int = 20  # iterations per refinement
    first_max_refinement: int | None = None  # the cap at i = 0, if different (D&B: 50)
    options: tuple[tuple[str, str], ...] = ()  # (key, value) read by the term groups (D&B: tv, attributes)
    paper: str | None = None  # key of PAPERS
    description: str = ""

    def __post_init__(self):
        unknown = set(self.terms) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss term(s) {sorted(unknown)}; the terms are {', '.join(TERMS)}")
        if self.schedule not in ("constant", "sqrt-decay"):
            raise ValueError(f"unknown step-size schedule {self.schedule!r} (constant or sqrt-decay)")
        if self.refinement is not None and self.refinement not in REFINEMENTS:
            raise ValueError(f"unknown refinement {self.refinement!r} ({', '.join(REFINEMENTS)} or None)")

    @property
    def threshold_map(self) -> dict[int, float]:
        return dict(self.thresholds)

    def refinement_cap(self, i: int) -> int:
        return self.first_max_refinement if (i == 0 and self.first_max_refinement is not None) else self.max_refinement

    def step_sizes(self, n_loop_steps: int) -> list[float]:
        """alpha_i for every loop index (A&E and D&B: ``20 * sqrt(linspace(1, .5, len(timesteps)))``)."""
        if self.schedule == "constant":
            return [float(self.step_size)] * n_loop_steps
        return [float(a) for a in self.step_size * np.sqrt(np.linspace(1.0, 0.5, n_loop_steps))]

    def option(self, key: str, default: str) -> str:
        return dict(self.options).get(key, default)

    def unmet(self, parts, diag, threshold: float) -> bool:
        """Whether this method's refinement should go on at ``threshold``."""
        return self.refinement is not None and REFINEMENTS[self.refinement](parts, diag, threshold)


_DB = dict(
    terms=frozenset({"db_attendance", "db_binding"}), step_size=20.0, schedule="sqrt-decay", refinement="db-tv",
    thresholds=((0, 0.05), (10, 0.2), (20, 0.3)), paper="divide-bind",
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("vanilla", frozenset(), label="Vanilla", description="Stable Diffusion without guidance"),
        Method(
            "syngen", frozenset({"syngen_positive", "syngen_negative"}), label="SynGen", step_size=20.0,
            paper="syngen",
            description="SynGen: pull each modifier's map onto its noun's, push both away from the other words",
        ),
        Method(
            "divide-bind", label="Divide & Bind", max_refinement=20, first_max_refinement=50, **_DB,
            description="Divide & Bind: maximise each object's total variation, match attributes to objects (JSD)",
        ),
        Method(
            "divide-bind-original", label="Divide & Bind (authors' code)", max_refinement=50,
            first_max_refinement=100, options=(("tv", "original"), ("attributes", "nearest-colour")), **_DB,
            description="Divide & Bind as the authors' latest pipeline computes it: their total variation, "
                        "refinement caps 100/50, one attribute per noun",
        ),
        Method(
            "attend-excite", frozenset({"ae_excite"}), label="Attend-and-Excite", step_size=20.0,
            schedule="sqrt-decay", refinement="ae-peak", thresholds=((0, 0.05), (10, 0.5), (20, 0.8)),
            max_refinement=20, paper="attend-excite",
            description="Attend-and-Excite: raise the attention peak of the most neglected subject",
        ),
    )
}
ALIASES = {
    "divide-and-bind": "divide-bind",
    "db": "divide-bind",
    "ae": "attend-excite",
    "a&e": "attend-excite",
    "attend-and-excite": "attend-excite",
    "none": "vanilla",
}


def method_names(guided_only: bool = False) -> list[str]:
    """The preset names, in table order (``guided_only``: without vanilla)."""
    return [n for n, m in METHODS.items() if m.terms or not guided_only]


def custom_method(terms: Iterable[str], **overrides) -> Method:
    """A method with any subset of ``TERMS``, on the schedule of the method it is closest to.

    With ``ae_excite`` it follows Attend-and-Excite's schedule and refinement, else with a Divide & Bind term
    Divide & Bind's, else SynGen's. ``overrides`` replace any field (step_size, schedule, thresholds...).
    """
    terms = frozenset(terms)
    families = {TERMS[t].family for t in terms if t in TERMS}
    base = METHODS[next((f for f in ("attend-excite", "divide-bind") if f in families), "syngen")]
    if "thresholds" in overrides and isinstance(overrides["thresholds"], Mapping):
        overrides["thresholds"] = tuple(sorted((int(k), float(v)) for k, v in overrides["thresholds"].items()))
    return dataclasses.replace(
        base, name="custom", label="Custom", terms=terms, description="custom combination of loss terms", **overrides
    )


def resolve_method(
    method: str | Method = "syngen",
    terms: Iterable[str] | None = None,
    step_size: float | None = None,
    intervention_steps: int | None = None,
) -> Method:
    """A ``Method`` from a preset name or label (or "custom" with ``terms``) and optional overrides."""
    if isinstance(method, Method):
        m = method
    else:
        key = str(method).strip().lower().replace("_", "-")
        by_label = {p.label.lower(): n for n, p in METHODS.items()}
        key = ALIASES.get(key, by_label.get(key, key))
        if key == "custom":
            if terms is None:
                raise ValueError(f"method 'custom' needs its loss terms: any of {', '.join(TERMS)}")
            m = custom_method(terms)
        elif key in METHODS:
            m = METHODS[key]
        else:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} or custom")
    if terms is not None and frozenset(terms) != m.terms:
        m = dataclasses.replace(m, name="custom", label="Custom", terms=frozenset(terms))
    if step_size is not None:
        m = dataclasses.replace(m, step_size=float(step_size))
    if intervention_steps is not None:
        m = dataclasses.replace(m, intervention_steps=int(intervention_steps))
    return m
