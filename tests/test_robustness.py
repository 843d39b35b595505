"""Every input path turns whatever a visitor types into a result or one clear message: a property over a
seeded corpus of careless and hostile prompts (``tests/corpus.py``), not a hand list."""

from __future__ import annotations

import pytest
from corpus import KINDS, prompts

from binding import lab
from binding.analysis import PromptError, analyze, bindings_from_pairs, pairs_from_bindings

CORPUS = prompts(1500, seed=11)


def _key(bindings):
    return [(b.noun.start, tuple(m.start for m in b.modifiers)) for b in bindings]


def test_the_corpus_covers_every_kind():
    assert {k for k, _ in CORPUS} == set(KINDS)


def test_analysis_gives_a_result_or_a_message_and_the_pairs_table_round_trips(nlp):
    failures, messages = [], 0
    for kind, prompt in CORPUS:
        try:
            a = analyze(prompt, nlp)
        except PromptError as exc:
            assert kind == "surrogate" and "not text" in str(exc), (kind, prompt, exc)
            messages += 1
            continue
        assert max((i for w in a.words for i in w.token_indices), default=0) <= 75
        rows = pairs_from_bindings(a)
        back, problems = bindings_from_pairs(a, rows)
        if problems or _key(back) != _key(a.bindings):
            failures.append((kind, prompt, rows, [str(p) for p in problems]))
    assert not failures, failures[:5]
    assert messages == sum(k == "surrogate" for k, _ in CORPUS)


@pytest.mark.parametrize("kind", ["surrogate", "long", "markup", "control"])
def test_the_app_view_never_raises(kind):
    for _, prompt in prompts(40, seed=3, kinds=[kind]):
        view = lab.prompt_view(prompt)
        if kind == "surrogate":
            assert "cannot be used" in view.notice and view.rows == []
        assert "<script" not in view.parse_html and "<script" not in view.tokens_html


def test_a_long_prompt_parses_only_what_clip_reads(nlp):
    prompt = " and ".join(["a red car"] * 400)  # about 2,000 pieces: only 75 reach the model
    a = analyze(prompt, nlp)
    assert len(a.doc.text) < 400 and a.truncated[-1].end == len(prompt)
    assert all(not w.token_indices for w in a.truncated)
    assert "not parsed" in " ".join(a.notes)
