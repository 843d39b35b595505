"""Prompt sets: the papers' counts and templates, a reproducible DVMP, user files, parsed bindings."""

import collections

import pytest

from binding.evaluation.prompts import (
    AE_OBJECTS,
    DVMP_ANIMALS,
    DVMP_COLOURS,
    DVMP_FRUITS,
    DVMP_MODIFIERS,
    DVMP_OBJECTS,
    SCENES,
    ae_prompts,
    db_prompts,
    dvmp_prompts,
    load_prompt_set,
    read_prompt_file,
    shapes_prompts,
)


def test_ae_set_has_the_papers_counts_and_members():
    ps = ae_prompts()
    assert len(ps) == 276 and len({p for p, _ in ps}) == 276
    assert collections.Counter(g for _, g in ps) == {"animal-animal": 66, "animal-object": 144, "object-object": 66}
    texts = {p for p, _ in ps}
    assert {"a cat and a dog", "a turtle and a mouse", "a lion with a crown", "a mouse with a bow"} <= texts
    assert "a cat and a cat" not in texts and "a dog and a cat" not in texts  # unordered pairs, no repeats
    assert any(t.startswith("a cat and a ") and t.endswith(" backpack") for t in texts)
    for text, group in ps:
        if group == "object-object":
            (c1, o1), (c2, o2) = [part.split()[1:] for part in text.split(" and ")]
            assert c1 != c2 and o1 in AE_OBJECTS and o2 in AE_OBJECTS


def test_dvmp_is_reproducible_from_its_seed_and_follows_the_rules():
    a, b, c = dvmp_prompts(100, seed=3), dvmp_prompts(100, seed=3), dvmp_prompts(100, seed=4)
    assert a == b and a != c
    assert len(DVMP_ANIMALS) == 16 and len(DVMP_OBJECTS) == 18 and len(DVMP_FRUITS) == 4
    assert len(DVMP_COLOURS) == 13 and len(set(DVMP_COLOURS) | {m for v in DVMP_MODIFIERS.values() for m in v}) == 25
    nouns = {"animal": DVMP_ANIMALS, "object": DVMP_OBJECTS, "fruit": DVMP_FRUITS}
    counts = collections.Counter()
    for text, group in dvmp_prompts(300, seed=0):
        phrases = text.split(" and ")
        assert 1 <= len(phrases) <= 3 and group == f"{len(phrases)}-phrase"
        heads = [p.split()[-1] for p in phrases]
        assert len(set(heads)) == len(heads)  # distinct nouns
        for p in phrases:
            words = p.split()[1:]
            cat = next(k for k, v in nouns.items() if words[-1] in v)
            mods = words[:-1]
            colours = [m for m in mods if m in DVMP_COLOURS]
            assert len(colours) <= 1 and len(mods) - len(colours) <= 2
            assert all(m in DVMP_MODIFIERS[cat] for m in mods if m not in DVMP_COLOURS)
            counts["colour"] += bool(colours)
            counts["phrases"] += 1
    assert 0.25 < counts["colour"] / counts["phrases"] < 0.42  # p = 1/3


def test_db_templates_and_shapes_set():
    ps = db_prompts()
    assert collections.Counter(g for _, g in ps) == {"animal-scene": 66, "color-obj-scene": 66}
    assert ps[0][0] == f"a cat and a dog {SCENES[0]}"
    assert all(any(t.endswith(s) for s in SCENES) for t, _ in ps)
    sh = shapes_prompts()
    assert len(sh) == 28 and sh[0] == ("a blue square and a yellow triangle", "unseen") and sh[-1][1] == "seen"


def test_user_files_text_and_csv(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("# my prompts\na red cat\n\n  a blue dog  \n", encoding="utf-8")
    assert read_prompt_file(t) == [("a red cat", ""), ("a blue dog", "")]
    c = tmp_path / "p.csv"
    c.write_text('id,Prompt,group\n1,"a red cat, sleeping",animals\n2,a green apple,fruit\n', encoding="utf-8")
    assert read_prompt_file(c) == [("a red cat, sleeping", "animals"), ("a green apple", "fruit")]
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="prompt"):
        read_prompt_file(bad)
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set(str(tmp_path / "missing.txt"))


def test_each_prompt_carries_its_bindings(tmp_path):
    s = load_prompt_set("ae", limit=None)
    assert len(s) == 276 and s.groups == ["animal-animal", "animal-object", "object-object"]
    p = next(p for p in s if p.text == "a cat and a red backpack")
    assert [(b.noun.text, [m.text for m in b.modifiers]) for b in p.bindings] == [("backpack", ["red"])]
    assert [n.text for n in p.nouns] == ["cat", "backpack"]
    assert s[0].bindings == () and [n.text for n in s[0].nouns] == ["cat", "dog"]
    d = load_prompt_set("dvmp:5:1", parse=False)
    assert d.name == "dvmp:5:1" and d.texts == [t for t, _ in dvmp_prompts(5, 1)] and d[0].analysis is None
    f = tmp_path / "x.txt"
    f.write_text("a yellow star and a blue circle\n", encoding="utf-8")
    (q,) = load_prompt_set(str(f))
    assert q.to_dict()["bindings"][0]["noun"]["text"] == "star"
