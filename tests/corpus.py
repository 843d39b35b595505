"""A seeded generator of prompts as careless and hostile visitors type them, for property tests and fuzzing.

Kinds: everyday bindings, repeated words, markup, punctuation only, odd punctuation, reference-like words
(``dog#2``, ``cat@5``, ``1,000``), Unicode (emoji, CJK, combining marks, right-to-left, exotic spaces),
control characters, lone surrogates, and prompts past CLIP's 77 tokens. ``prompts(n, seed)`` is a pure
function of its arguments.
"""

from __future__ import annotations

import random

ADJ = ["red", "green", "blue", "yellow", "pink", "purple", "dark", "small", "fluffy", "wooden", "checkered",
       "shiny", "old", "striped", "golden", "tiny"]
NOUN = ["apple", "banana", "dog", "cat", "car", "house", "bowl", "table", "bird", "flamingo", "sunflower",
        "chair", "clock", "hat", "lion", "monkey"]
PUNCT = list(".,;:!?-—–…()[]{}<>\"'`/\\|*&^%$#@~+=_")
UNICODE = ["🍎", "🐶", "❤️", "👩‍🚀", "東京", "赤い", "车", "café", "naïve", "e\u0301", "Ω", "ß", "ﬁ", "עברית",
           "العربية", "\u200b", "\u00a0", "\u2009", "\u3000", "\ufeff", "İ", "ǅ"]
CONTROL = ["\x00", "\x07", "\x1b", "\x7f", "\t", "\r", "\n", "\x85", "\u2028"]
SURROGATES = ["\ud800", "\udfff", "\udc80", "\ud83c"]
MARKUP = ["<b>{}</b>", "<script>alert('{}')</script>", "**{}**", "[{}](http://x)", "<img src=x onerror=alert(1)>{}",
          "&lt;{}&gt;", "{{{{ {} }}}}", "`{}`", "<!-- {} -->", "%s {}", "{}\\n"]


def _phrase(rng: random.Random) -> str:
    mods = rng.sample(ADJ, rng.choice([0, 1, 1, 2]))
    joiner = rng.choice([" ", " and ", ", "]) if len(mods) > 1 else " "
    det = rng.choice(["a", "the", "an", "", "two"])
    body = joiner.join(mods) + (" " if mods else "") + rng.choice(NOUN)
    return f"{det} {body}".strip()


def _everyday(rng: random.Random) -> str:
    return rng.choice([" and ", " with ", " next to ", ", "]).join(_phrase(rng) for _ in range(rng.randint(1, 3)))


def _repeated(rng: random.Random) -> str:
    noun = rng.choice(NOUN)
    return " and ".join(f"a {rng.choice(ADJ)} {noun}" for _ in range(rng.randint(2, 4)))


def _markup(rng: random.Random) -> str:
    return rng.choice(MARKUP).format(_everyday(rng))


def _punctuation_only(rng: random.Random) -> str:
    return "".join(rng.choice(PUNCT + [" "]) for _ in range(rng.randint(1, 30)))


def _odd_punctuation(rng: random.Random) -> str:
    words = _everyday(rng).split()
    return "".join(w + rng.choice(["", "", " ", "-", "--", "...", ",,", " ,", "'", "/", "&", "·"]) + " " for w in words)


def _reference_like(rng: random.Random) -> str:
    w = rng.choice(NOUN)
    tricky = rng.choice([f"{w}#2", f"{w}#1", f"{w}@3", "#1", "@0", "1,000", "3.5", "red,blue", "a#", f"{w}#{w}",
                         f"#{w}", f"{w}@", "50%", "x@y.com"])
    return f"a {rng.choice(ADJ)} {tricky} and a {rng.choice(ADJ)} {w}"


def _unicode(rng: random.Random) -> str:
    words = _everyday(rng).split()
    for _ in range(rng.randint(1, 4)):
        k = rng.randrange(len(words) + 1)
        words.insert(k, rng.choice(UNICODE) + rng.choice(["", rng.choice(ADJ)]))
    return rng.choice([" ", "\u00a0", "\u3000", "  "]).join(words)


def _control(rng: random.Random) -> str:
    s = list(_everyday(rng))
    for _ in range(rng.randint(1, 4)):
        s.insert(rng.randrange(len(s) + 1), rng.choice(CONTROL))
    return "".join(s)


def _surrogate(rng: random.Random) -> str:
    s = list(_everyday(rng))
    s.insert(rng.randrange(len(s) + 1), rng.choice(SURROGATES))
    return "".join(s)


def _long(rng: random.Random) -> str:
    return " and ".join(_phrase(rng) for _ in range(rng.randint(20, 60)))


KINDS = {
    "everyday": _everyday, "repeated": _repeated, "markup": _markup, "punctuation": _punctuation_only,
    "odd-punctuation": _odd_punctuation, "reference-like": _reference_like, "unicode": _unicode,
    "control": _control, "surrogate": _surrogate, "long": _long,
}


def prompts(n: int, seed: int = 0, kinds=None) -> list[tuple[str, str]]:
    """``n`` (kind, prompt) pairs, the kinds taken in turn."""
    rng = random.Random(seed)
    names = list(kinds or KINDS)
    return [(names[i % len(names)], KINDS[names[i % len(names)]](rng)) for i in range(n)]
