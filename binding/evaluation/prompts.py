"""Prompt sets for evaluation: the papers' benchmarks, the shapes world's held-out prompts, and user files.

Every set is a plain, ordered list of prompts with a group label (the paper's sub-category), so a prompt's
index is stable and can name its results on disk. ``load_prompt_set`` parses each prompt once with
``binding.analysis.analyze``, so every prompt carries the bindings the guidance will use.

Built-in sets (the papers' benchmarks):

- ``ae``: Attend-and-Excite's 276 prompts. 66 animal-animal ("a cat and a dog": every unordered pair of the 12
  animals), 144 animal-object (each animal with each of the 12 objects: "a cat with a crown" for the three
  wearable objects glasses, crown, bow, "a cat and a red backpack" for the other nine) and 66 object-object
  ("a red backpack and a blue chair": every unordered pair of the 12 objects). The paper drew the colours at
  random and did not publish the draw; here they cycle through the 11 colours by position (see ``_colour``),
  so the set is fixed and the two colours of a prompt always differ.
- ``dvmp``: SynGen's Diverse Visual Modifier Prompts, drawn from a seed (``dvmp_prompts``); ``dvmp:N:SEED``
  picks the count and seed (default 200 prompts, seed 0). SynGen published the word lists and rules, not
  the nouns per category; ours are below (16 animals, 18 objects, 4 fruits).
- ``db``: Divide & Bind's two scene templates over the A&E pairs: Animal-Scene ("a cat and a dog on the
  beach") and Color-Obj-Scene ("a red backpack and a blue chair in a kitchen"), 66 each. The paper names
  the templates, not its scene phrases; ``SCENES`` are ours, cycled by position.
- ``shapes``: the teaching world's 28 held-out prompts (groups "unseen" and "seen").

A user file is one prompt per line (blank lines and lines starting with # are skipped), or a .csv with a
``prompt`` column (and optionally a ``group`` column).
"""

from __future__ import annotations

import csv
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "AE_ANIMALS",
    "AE_COLOURS",
    "AE_OBJECTS",
    "BUILTIN_SETS",
    "DVMP_ANIMALS",
    "DVMP_COLOURS",
    "DVMP_FRUITS",
    "DVMP_MODIFIERS",
    "DVMP_OBJECTS",
    "Prompt",
    "PromptSet",
    "SCENES",
    "ae_prompts",
    "db_prompts",
    "dvmp_prompts",
    "load_prompt_set",
    "read_prompt_file",
    "shapes_prompts",
]

AE_ANIMALS = ("cat", "dog", "bird", "bear", "lion", "horse", "elephant", "monkey", "frog", "turtle", "rabbit", "mouse")
AE_OBJECTS = (
    "backpack", "glasses", "crown", "suitcase", "chair", "balloon", "bow", "car", "bowl", "bench", "clock", "apple",
)
AE_WEARABLES = ("glasses", "crown", "bow")  # "a [animal] with a [wearable]"
AE_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black", "white")

DVMP_ANIMALS = (
    "cat", "dog", "bird", "bear", "lion", "horse", "elephant", "monkey",
    "frog", "turtle", "rabbit", "mouse", "panda", "zebra", "gorilla", "penguin",
)
DVMP_OBJECTS = (
    "backpack", "crown", "suitcase", "chair", "balloon", "bow", "car", "bowl", "bench",
    "clock", "camera", "umbrella", "guitar", "shoe", "hat", "surfboard", "skateboard", "bicycle",
)
DVMP_FRUITS = ("apple", "tomato", "banana", "strawberry")
DVMP_COLOURS = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black", "white", "beige", "teal",
)
DVMP_MODIFIERS = {
    "animal": ("furry", "baby", "spotted", "sleepy"),
    "object": ("modern", "spotted", "wooden", "metal", "curved", "spiky", "checkered"),
    "fruit": ("sliced", "skewered"),
}
DVMP_DEFAULT_N = 200

SCENES = ("on the beach", "in the forest", "in a kitchen", "on a city street", "in the snow", "on the grass")

BUILTIN_SETS = ("ae", "dvmp", "db", "shapes", "shapes-calibration")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a set: its position (names its results), text, group, and the parse the guidance uses."""

    index: int
    text: str
    group: str = ""
    analysis: object = field(default=None, compare=False, repr=False)  # binding.analysis.Analysis

    @property
    def bindings(self) -> tuple:
        return tuple(self.analysis.bindings) if self.analysis is not None else ()

    @property
    def nouns(self) -> tuple:
        return tuple(self.analysis.nouns) if self.analysis is not None else ()

    def to_dict(self) -> dict:
        d = {"index": self.index, "text": self.text, "group": self.group}
        if self.analysis is not None:
            d["bindings"] = [b.to_dict() for b in self.analysis.bindings]
            d["nouns"] = [w.to_dict() for w in self.analysis.nouns]
        return d


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[Prompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(p.group for p in self.prompts))


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _colour(k: int, offset: int = 0) -> str:
    return AE_COLOURS[(k + offset) % len(AE_COLOURS)]


def ae_prompts() -> list[tuple[str, str]]:
    """Attend-and-Excite's 276 (prompt, group) pairs, in a fixed order."""
    out = [(f"{_a(x)} and {_a(y)}", "animal-animal") for x, y in itertools.combinations(AE_ANIMALS, 2)]
    k = 0
    for animal in AE_ANIMALS:
        for obj in AE_OBJECTS:
            if obj in AE_WEARABLES:
                out.append((f"{_a(animal)} with {_a(obj)}", "animal-object"))
            else:
                out.append((f"{_a(animal)} and {_a(_colour(k) + ' ' + obj)}", "animal-object"))
                k += 1
    for k, (x, y) in enumerate(itertools.combinations(AE_OBJECTS, 2)):
        # offsets 0 and 5 (coprime with 11): the two colours of a prompt always differ
        out.append((f"{_a(_colour(k) + ' ' + x)} and {_a(_colour(k, 5) + ' ' + y)}", "object-object"))
    return out


def _dvmp_phrase(rng: random.Random, noun: str, category: str) -> str:
    mods = rng.sample(DVMP_MODIFIERS[category], rng.randint(0, 2))
    if rng.random() < 1 / 3:
        mods.append(rng.choice(DVMP_COLOURS))  # the colour last: "a sleepy brown bear"
    return _a(" ".join([*mods, noun]))


def dvmp_prompts(n: int = DVMP_DEFAULT_N, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` DVMP (prompt, group) pairs from ``seed``: 1-3 phrases of distinct nouns joined by " and ".

    Each phrase: a noun (category uniform over animal/object/fruit, then uniform within it), 0-2 of its
    category's modifiers, and with probability 1/3 a colour. The group is the number of phrases ("1-phrase"...).
    Only ``random.Random(seed)`` is used, so a seed gives the same prompts everywhere.
    """
    rng = random.Random(seed)
    pools = {"animal": DVMP_ANIMALS, "object": DVMP_OBJECTS, "fruit": DVMP_FRUITS}
    out = []
    for _ in range(n):
        k = rng.randint(1, 3)
        used: set[str] = set()
        phrases = []
        while len(phrases) < k:
            category = rng.choice(("animal", "object", "fruit"))
            noun = rng.choice(pools[category])
            if noun in used:
                continue
            used.add(noun)
            phrases.append(_dvmp_phrase(rng, noun, category))
        out.append((" and ".join(phrases), f"{k}-phrase"))
    return out


def db_prompts() -> list[tuple[str, str]]:
    """Divide & Bind's Animal-Scene and Color-Obj-Scene templates over the A&E pairs (66 each)."""
    out = [
        (f"{_a(x)} and {_a(y)} {SCENES[k % len(SCENES)]}", "animal-scene")
        for k, (x, y) in enumerate(itertools.combinations(AE_ANIMALS, 2))
    ]
    out += [
        (f"{_a(_colour(k) + ' ' + x)} and {_a(_colour(k, 5) + ' ' + y)} {SCENES[k % len(SCENES)]}", "color-obj-scene")
        for k, (x, y) in enumerate(itertools.combinations(AE_OBJECTS, 2))
    ]
    return out


def shapes_prompts() -> list[tuple[str, str]]:
    """The teaching world's held-out prompts: 14 with a withheld colour-shape combination, 14 without."""
    from binding.shapes import world

    return [(p, "unseen") for p in world.HELDOUT_UNSEEN] + [(p, "seen") for p in world.HELDOUT_SEEN]


def shapes_calibration_prompts() -> list[tuple[str, str]]:
    """Captions of the teaching world apart from the held-out ones, for tuning step sizes (never for scores)."""
    from binding.shapes import world

    return [(p, "calibration") for p in world.calibration_prompts()]


def read_prompt_file(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, group) pairs from a text file (one prompt per line) or a CSV with a ``prompt`` column."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        fields = {(f or "").strip().lower(): f for f in reader.fieldnames or ()}
        if "prompt" not in fields:
            raise ValueError(f"{path}: a CSV needs a 'prompt' column (found: {', '.join(reader.fieldnames or ())})")
        group = fields.get("group")
        out = [
            (row[fields["prompt"]].strip(), (row.get(group) or "").strip() if group else "")
            for row in reader
            if (row.get(fields["prompt"]) or "").strip()
        ]
    else:
        lines = (line.strip() for line in text.splitlines())
        out = [(line, "") for line in lines if line and not line.startswith("#")]
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def _resolve(spec: str) -> tuple[str, list[tuple[str, str]]]:
    name, _, rest = str(spec).partition(":")
    key = name.strip().lower()
    if key == "ae":
        return "ae", ae_prompts()
    if key == "db":
        return "db", db_prompts()
    if key == "shapes":
        return "shapes", shapes_prompts()
    if key == "shapes-calibration":
        return "shapes-calibration", shapes_calibration_prompts()
    if key == "dvmp":
        parts = [p for p in rest.split(":") if p] if rest else []
        try:
            n = int(parts[0]) if parts else DVMP_DEFAULT_N
            seed = int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            raise ValueError(f"a DVMP set is dvmp, dvmp:N or dvmp:N:SEED, not {spec!r}") from None
        return f"dvmp:{n}:{seed}", dvmp_prompts(n, seed)
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path), read_prompt_file(path)
    raise ValueError(f"unknown prompt set {spec!r}: give one of {', '.join(BUILTIN_SETS)} (dvmp:N:SEED) or a file")


def load_prompt_set(
    spec: str, limit: int | None = None, parse: bool = True, nlp=None, tokenizer=None
) -> PromptSet:
    """A built-in set by name or a prompt file by path, each prompt parsed (``parse=False`` skips spaCy).

    ``limit`` keeps the first N prompts (a quick look at a big set).
    """
    name, pairs = _resolve(spec)
    if limit is not None:
        pairs = pairs[: max(0, int(limit))]
    prompts = []
    if parse:
        from binding.analysis import analyze, load_parser
        from binding.tokenizer import load_tokenizer

        nlp = nlp or load_parser()
        tokenizer = tokenizer or load_tokenizer()
    for i, (text, group) in enumerate(pairs):
        prompts.append(Prompt(i, text, group, analyze(text, nlp, tokenizer) if parse else None))
    return PromptSet(name, tuple(prompts))
