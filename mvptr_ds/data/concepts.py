"""Offline concept extraction and concept-vocabulary building (MVPTR.md section 5), pure Python.

The authors parsed captions with the SPICE scene-graph parser (Java, model downloads). This module
approximates its output with rules: tokenise, tag each word from closed word lists and the lexicon
(objects, attributes and relations named in the vocabulary's own tuples, optionally the detector label
map ``VG-SGG-dicts-vgoi6-clipped.json``), chunk noun phrases, then emit

* ``(object,)`` for each noun-phrase head,
* ``(object, attribute)`` for each modifier of a head (adjectives, numbers, compound nouns, and
  predicative adjectives after "is/are"),
* ``(subject, relation, object)`` between noun phrases, SPICE-style: a verb and the preposition that
  follows it form one relation ("sitting on" -> "sit on"); coordinated phrases ("a man and a woman")
  share it. Of several readings the first one present in the vocabulary is kept.

Lemmas are chosen among rule-generated candidates (plural -> singular, -ing/-ed/-s -> base, an
irregular table) by how often each candidate fills that role in the lexicon, so the lemmatiser follows
the vocabulary's own conventions ("shorts" stays, "men" -> "man"). Only tuples in the vocabulary are kept.

Concept ids of :func:`build_vocab` follow the authors' layout: with a tokenizer vocabulary
(``vocab.txt``), single-word concepts that are word pieces reuse their word id; every other concept gets
an id from the size of the word vocabulary upwards, multi-element tuples first (by descending sentence
count, then alphabetically), then the single words missing from the tokenizer.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from mvptr_ds.files import atomic_write_lines

from .caption_files import CaptionIndex, ConceptVocab, read_id2phrase, write_id2phrase
from .readers import DataError

Tuple_ = Tuple[str, ...]

DET = set("a an the this these those some its his her their our my your another each every any".split())
AUX = set("is are was were be been being am".split())
PRON = set("it they he she them him there here what someone something i we you".split())
REL = set("that which who whose where while".split())
CONJ = {"and", "or", "&"}
PREP = set("on in at of with near by under over behind to across through down up along around into onto "
           "from for during against above below beside besides between inside outside off toward towards "
           "past beneath underneath among atop out like without via about after before beyond upon within "
           "next".split())
MULTI_PREP = [("on", "top", "of"), ("in", "front", "of"), ("next", "to"), ("close", "to"), ("out", "of"),
              ("on", "top"), ("in", "between"), ("on", "back", "of")]
NUM = set("one two three four five six seven eight nine ten eleven twelve several many few".split())
COLLECTIVE = set("group bunch herd flock crowd couple pair lot number team row pile stack line set variety "
                 "kind type".split())
IRREGULAR = {
    "men": ["man"], "women": ["woman"], "children": ["child"], "feet": ["foot"], "teeth": ["tooth"],
    "mice": ["mouse"], "geese": ["goose"], "sat": ["sit"], "stood": ["stand"], "held": ["hold"],
    "rode": ["ride"], "ridden": ["ride"], "ate": ["eat"], "eaten": ["eat"], "flew": ["fly"],
    "flown": ["fly"], "took": ["take"], "taken": ["take"], "wore": ["wear"], "worn": ["wear"],
    "has": ["have"], "had": ["have"], "having": ["have"], "did": ["do"], "does": ["do"], "done": ["do"],
    "went": ["go"], "goes": ["go"], "made": ["make"], "saw": ["see"], "seen": ["see"],
    "lying": ["lie", "lay"], "laying": ["lay", "lie"], "caught": ["catch"], "threw": ["throw"],
    "thrown": ["throw"], "drove": ["drive"], "driven": ["drive"], "built": ["build"], "hung": ["hang"],
    "got": ["get"], "ran": ["run"], "swam": ["swim"], "stuck": ["stick"], "brought": ["bring"],
    "bought": ["buy"], "led": ["lead"], "fed": ["feed"], "slept": ["sleep"], "knives": ["knife"],
    "leaves": ["leaf", "leave"], "shelves": ["shelf"], "wolves": ["wolf"], "halves": ["half"],
    "is": ["be"], "are": ["be"], "was": ["be"], "were": ["be"],
}
# Base forms of the verbs among the detector's predicates ("sitting on", "has", "parked on", ...).
PREDICATE_BASE = {
    "attached": "attach", "belonging": "belong", "carrying": "carry", "covered": "cover", "covering": "cover",
    "eating": "eat", "flying": "fly", "growing": "grow", "hanging": "hang", "has": "have", "holding": "hold",
    "laying": "lay", "looking": "look", "lying": "lie", "made": "make", "mounted": "mount",
    "painted": "paint", "parked": "park", "playing": "play", "riding": "ride", "says": "say",
    "sitting": "sit", "standing": "stand", "using": "use", "walking": "walk", "watching": "watch",
    "wearing": "wear", "wears": "wear",
}
TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[.,;:!?]")


def tokenize(text: str) -> List[Tuple[str, int, int]]:
    """Lower-cased words and punctuation with character spans: ``[(word, start, end), ...]``."""
    out = []
    for m in TOKEN_RE.finditer(text.lower()):
        w, s = m.group(), m.start()
        if w.endswith("'s"):
            out.append((w[:-2], s, s + len(w) - 2))
            out.append(("'s", s + len(w) - 2, m.end()))
        else:
            out.append((w, s, m.end()))
    return out


def lemma_candidates(word: str) -> List[str]:
    """The word and its possible base forms (singular nouns, verb stems), most likely first."""
    c = [word] + IRREGULAR.get(word, [])
    if word.endswith("ies") and len(word) > 4:
        c.append(word[:-3] + "y")
    if word.endswith("ves"):
        c += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es") and len(word) > 3:
        c.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        c.append(word[:-1])
    for suf in ("ing", "ed"):
        if word.endswith(suf) and len(word) >= len(suf) + 2:
            stem = word[:-len(suf)]
            c += [stem, stem + "e"]
            if len(stem) > 2 and stem[-1] == stem[-2]:
                c.append(stem[:-1])
            if suf == "ing" and stem.endswith("y"):
                c.append(stem[:-1] + "ie")
            if suf == "ed" and stem.endswith("i"):
                c.append(stem[:-1] + "y")
    return list(dict.fromkeys(c))


def best_lemma(word: str, counts: Counter) -> Tuple[str, int]:
    """The candidate base form of ``word`` that fills the role of ``counts`` most often, and its count."""
    cands = lemma_candidates(word)
    best = max(cands, key=lambda w: (counts.get(w, 0), -cands.index(w)))
    return best, counts.get(best, 0)


@dataclass
class Lexicon:
    """Role counts used to tag words, and the vocabulary that filters the output (None: keep all)."""

    nouns: Counter = field(default_factory=Counter)
    attrs: Counter = field(default_factory=Counter)
    verbs: Counter = field(default_factory=Counter)     # first word of each relation
    vocab: Optional[Dict[Tuple_, int]] = None

    def keep(self, t: Tuple_) -> bool:
        return self.vocab is None or t in self.vocab


def build_lexicon(vocab: Optional[ConceptVocab] = None, labels: Optional[str] = None) -> Lexicon:
    """Lexicon from a concept vocabulary's tuples and/or the detector label map JSON
    (``label_to_idx``, ``attribute_to_idx``, ``predicate_to_idx``)."""
    lex = Lexicon(vocab=dict(vocab.tuple_to_id) if vocab is not None else None)
    if vocab is not None:
        for t in vocab.tuple_to_id:
            if len(t) == 2:
                lex.nouns[t[0]] += 1
                lex.attrs[t[1]] += 1
            elif len(t) == 3:
                lex.nouns[t[0]] += 1
                lex.nouns[t[2]] += 1
                first = t[1].split()[0]
                if first not in PREP:
                    lex.verbs[first] += 1
    if labels is not None:
        with open(labels, "r", encoding="utf-8") as f:
            maps = json.load(f)
        for key in ("label_to_idx", "attribute_to_idx", "predicate_to_idx"):
            if key not in maps:
                raise DataError(labels, f"missing {key!r} (expected the VinVL label map)", field=key)
        for name in maps["label_to_idx"]:
            lex.nouns[name.split()[-1]] += 1
        for name in maps["attribute_to_idx"]:
            lex.attrs[name] += 1
        for name in maps["predicate_to_idx"]:
            first = name.split()[0]
            if first in PREDICATE_BASE:
                lex.verbs[PREDICATE_BASE[first]] += 1
    return lex


@dataclass
class _NP:
    heads: List[Tuple[str, int]]                         # (lemma, word index) of coordinated heads
    mods: List[List[Tuple[str, int]]]                    # modifiers of each head


def _tag(words: List[str], lex: Lexicon) -> List[Tuple[str, str, int]]:
    """``[(tag, lemma, length)]`` per position; tags NOUN ADJ NUM VERB PREP DET AUX CONJ REL BREAK."""
    tags, i = [], 0
    while i < len(words):
        w = words[i]
        mp = next((m for m in MULTI_PREP if tuple(words[i:i + len(m)]) == m), None)
        if mp:
            tags.append(("PREP", " ".join(mp), len(mp)))
            i += len(mp)
            continue
        prev = tags[-1][0] if tags else "BREAK"
        nxt = words[i + 1] if i + 1 < len(words) else "."
        noun, nc = best_lemma(w, lex.nouns)
        verb, vc = best_lemma(w, lex.verbs)
        attr, ac = best_lemma(w, lex.attrs)
        if w in DET:
            t = ("DET", w)
        elif w in AUX:
            t = ("AUX", w)
        elif w in REL:
            t = ("REL", w)
        elif w in CONJ:
            t = ("CONJ", w)
        elif w in PREP:
            t = ("PREP", w)
        elif w in NUM or w.isdigit():
            t = ("NUM", w)
        elif w in PRON or not w[0].isalnum():
            t = ("BREAK", w)
        elif vc and w.endswith(("ing", "ed")) and not (prev in ("DET", "ADJ", "NUM") and nc >= vc):
            before_noun = prev in ("DET", "NUM", "ADJ") and best_lemma(nxt, lex.nouns)[1] > 0
            t = ("ADJ", w) if before_noun else ("VERB", verb)
        elif vc >= nc and vc and prev in ("NOUN", "AUX", "CONJ") and (nxt in DET or nxt in PREP or nxt in NUM):
            t = ("VERB", verb)
        elif nc and nc >= ac:
            t = ("NOUN", noun)
        elif ac:
            t = ("ADJ", attr)
        elif nc:
            t = ("NOUN", noun)
        else:
            t = ("ADJ", w)                               # unknown word: a modifier at best
        tags.append((t[0], t[1], 1))
        i += 1
    return tags


def _chunks(words: List[str], lex: Lexicon) -> list:
    """Group tagged words into items ``(tag, value, word index)``; value an ``_NP`` for "NP", a list
    of ``(lemma, index)`` for "MODS" (modifiers without a noun), else the lemma."""
    items, pos = [], 0
    run: List[Tuple[str, str, int]] = []

    def flush():
        nonlocal run
        if run:
            nouns = [k for k, r in enumerate(run) if r[0] == "NOUN"]
            if nouns:
                h = nouns[-1]
                items.append(("NP", _NP([(run[h][1], run[h][2])], [[(r[1], r[2]) for r in run[:h]]]),
                              run[h][2]))
            else:
                items.append(("MODS", [(r[1], r[2]) for r in run], run[0][2]))
            run = []

    for tag, lem, n in _tag(words, lex):
        if tag in ("NOUN", "ADJ", "NUM"):
            if run and run[-1][0] == "NOUN" and tag != "NOUN":
                flush()
            run.append((tag, lem, pos))
        else:
            flush()
            if tag != "DET":
                items.append((tag, lem, pos))
        pos += n
    flush()
    # "black and white cat": modifiers joined to the next noun phrase; "a man and a woman": one group
    out = []
    for it in items:
        if it[0] == "NP" and len(out) >= 2 and out[-1][:2] == ("CONJ", "and") and out[-2][0] == "MODS":
            it[1].mods[0] = out[-2][1] + it[1].mods[0]
            del out[-2:]
        if it[0] == "NP" and len(out) >= 2 and out[-1][0] == "CONJ" and out[-2][0] == "NP":
            out[-2][1].heads += it[1].heads
            out[-2][1].mods += it[1].mods
            out.pop()
            continue
        out.append(it)
    return out


def extract_with_words(caption: str, lex: Lexicon) -> List[Tuple[Tuple_, List[int]]]:
    """Tuples of ``caption`` present in the lexicon's vocabulary, each with the indices (into
    ``tokenize(caption)``) of the words it came from, in order of appearance, without duplicates."""
    words = [w for w, _, _ in tokenize(caption)]
    found: Dict[Tuple_, List[int]] = {}

    def emit(cands: Sequence[Tuple[Tuple_, List[int]]]) -> None:
        for t, src in cands:
            if lex.keep(t):
                found.setdefault(t, sorted(set(src)))
                return

    subj = prev = None
    verb = None                                          # (lemma, index) of the active verb
    between: list = []
    for kind, val, at in _chunks(words, lex):
        if kind == "NP":
            for (h, hi), mods in zip(val.heads, val.mods):
                emit([((h,), [hi])])
                for m, mi in mods:
                    emit([((h, m), [hi, mi])])
            preps = [b for b in between if b[0] == "PREP"]
            prep = preps[-1][1] if preps else None
            for (s, si) in (subj.heads if subj else []):
                for (o, oi) in val.heads:
                    cands = []
                    if verb and prep:
                        cands.append(((s, f"{verb[0]} {prep}", o), [si, verb[1], oi]))
                    elif verb:
                        cands.append(((s, verb[0], o), [si, verb[1], oi]))
                    for (p, pi) in (prev.heads if prev is not None and prev is not subj else []):
                        if prep:
                            cands.append(((p, prep, o), [pi, oi]))
                        elif verb:
                            cands.append(((p, verb[0], o), [pi, verb[1], oi]))
                    if prep:
                        cands.append(((s, prep, o), [si, oi]))
                    emit(cands)
            if subj is None:
                subj = val
            elif prep == "of" and prev is subj and subj.heads[0][0] in COLLECTIVE:
                subj = val                               # "a group of people standing ..."
            prev, between = val, []
        elif kind == "MODS":
            if any(b[0] == "AUX" for b in between) and prev is not None:   # "the cat is black"
                for (h, hi) in prev.heads:
                    for m, mi in val:
                        emit([((h, m), [hi, mi])])
        elif kind == "VERB":
            verb = (val, at)
            between.append((kind, val))
        elif kind == "REL":
            subj, verb, between = prev, None, []
        elif kind == "BREAK" and val in ".;!?":
            subj = prev = verb = None
            between = []
        else:
            between.append((kind, val))
    return list(found.items())


def extract_tuples(caption: str, lexicon: Lexicon) -> List[Tuple_]:
    """(object), (object, attribute) and (subject, relation, object) tuples of ``caption`` that are in
    the lexicon's vocabulary, in order of appearance."""
    return [t for t, _ in extract_with_words(caption, lexicon)]


def _write_jsonl(path: str, records) -> None:
    atomic_write_lines(path, (json.dumps(r) + "\n" for r in records))


def extract_concepts(captions: str, vocab: str, out: str, labels: Optional[str] = None) -> dict:
    """Add extracted concept tuples to every caption: writes JSONL ``out`` with records
    ``{"image_id", "caption", "phrases": [[elem, ...], ...]}`` (only tuples in ``vocab``).

    Args:
        captions: captions JSON list or JSONL. Tuples already in a record's ``phrases`` are replaced;
            those not in the vocabulary are counted in the report.
        vocab: ``id2phrase.json``.
        out: output JSONL path.
        labels: optional detector label map JSON (``VG-SGG-dicts-vgoi6-clipped.json``) to widen the lexicon.
    Returns:
        report: captions, tuples written, per-arity counts, captions without any tuple, and the given
        phrases that were not in the vocabulary (count and a few examples).
    """
    cv = read_id2phrase(vocab)
    lex = build_lexicon(cv, labels)
    index = CaptionIndex(captions)
    arity: Counter = Counter()
    given_unknown: Counter = Counter()
    empty = 0

    def records():
        nonlocal empty
        for i in range(len(index)):
            image_id, cap, phrases = index[i]
            for t in phrases or []:
                if cv.lookup(t) is None:
                    given_unknown[t] += 1
            tuples = extract_tuples(cap, lex)
            arity.update(len(t) for t in tuples)
            empty += not tuples
            yield {"image_id": image_id, "caption": cap, "phrases": [list(t) for t in tuples]}

    _write_jsonl(out, records())
    return {"captions": len(index), "tuples": sum(arity.values()), "objects": arity[1],
            "attribute_pairs": arity[2], "relation_triples": arity[3], "captions_without_tuples": empty,
            "given_tuples_not_in_vocab": sum(given_unknown.values()),
            "given_not_in_vocab_examples": [list(t) for t, _ in given_unknown.most_common(10)], "out": out}


def _tokenizer_vocab(tokenizer: str) -> Dict[str, int]:
    """``token -> id`` from a tokenizer directory's ``vocab.txt`` (or the file itself)."""
    path = os.path.join(tokenizer, "vocab.txt") if os.path.isdir(tokenizer) else tokenizer
    if not os.path.isfile(path):
        raise DataError(path, "tokenizer vocabulary not found (expected a vocab.txt)", field="tokenizer")
    with open(path, "r", encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def build_vocab(captions: str, out: str, min_sentences: int = 50, labels: Optional[str] = None,
                tokenizer: Optional[str] = None, word_vocab_size: int = 30522) -> dict:
    """Build ``id2phrase.json`` from the tuples of ``captions``, keeping those in >= ``min_sentences``.

    Tuples come from each record's ``phrases`` when present, otherwise from :func:`extract_tuples`
    with a lexicon from ``labels`` (the detector label map; required then). A tuple counts once per
    sentence. Ids: see the module docstring (``tokenizer`` gives word ids for single-word concepts and
    the word vocabulary size; without it ids start at ``word_vocab_size``).

    Returns:
        report: sentences, distinct tuples seen, tuples kept (per arity), id range, ``out``.
    """
    if min_sentences < 1:
        raise DataError(captions, f"min_sentences must be >= 1, got {min_sentences}", field="min_sentences")
    index = CaptionIndex(captions)
    lex = build_lexicon(None, labels) if labels else None
    counts: Counter = Counter()
    extracted = 0
    for i in range(len(index)):
        _, cap, phrases = index[i]
        if phrases is None:
            if lex is None:
                raise DataError(captions, "caption has no 'phrases' and no --labels lexicon was given to "
                                "extract them", int(index.lines[i]), "phrases", "line")
            phrases = extract_tuples(cap, lex)
            extracted += 1
        counts.update(set(phrases))
    kept = sorted((t for t, c in counts.items() if c >= min_sentences), key=lambda t: (-counts[t], t))
    words = _tokenizer_vocab(tokenizer) if tokenizer else {}
    next_id = len(words) if tokenizer else word_vocab_size
    id_to_tuple: Dict[int, Tuple_] = {}
    for t in [t for t in kept if len(t) == 1 and t[0] in words]:
        id_to_tuple[words[t[0]]] = t
    for t in [t for t in kept if len(t) > 1] + [t for t in kept if len(t) == 1 and t[0] not in words]:
        id_to_tuple[next_id] = t
        next_id += 1
    write_id2phrase(out, id_to_tuple)
    arity = Counter(len(t) for t in kept)
    return {"sentences": len(index), "extracted_sentences": extracted, "distinct_tuples": len(counts),
            "kept": len(kept), "objects": arity[1], "attribute_pairs": arity[2], "relation_triples": arity[3],
            "min_id": min(id_to_tuple, default=None), "max_id": max(id_to_tuple, default=None), "out": out}
