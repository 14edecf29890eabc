"""The built-in scene world behind ``--data synthetic[:key=value,...]``: a seeded, learnable stand-in for
VinVL features + tags + captions + concepts, with the ground truth real data lacks (which region each
concept refers to), so retrieval and phrase grounding can both be learned and scored.

The world has *laws* and *samples*. The laws, drawn from ``world_seed`` and the vocabulary sizes, are:
the object classes, attributes and predicates (the first ``classes`` / ``attributes`` / ``predicates``
names of ``assets/scene_names.json``, taken from the VinVL detector label map), a fixed random 2048-d
prototype per class, per attribute and per background "stuff" kind, the attributes each class can take,
and the relation triples that occur. The concept table (MVPTR.md section 5) is every object, every
(object, attribute) pair a class can take and every relation triple of the laws; so two worlds that differ
only in ``seed`` share their tokenizer, concept ids and prototypes, and a model trained on one transfers.
The samples, drawn from ``seed``, are the images and captions:

* an image has ``objects`` (a range, default 3-8) objects of distinct classes, each with one attribute;
  one or two relation triples of the laws link some of them. Each object is a region whose 2048-d
  feature is ``relu(class prototype + 0.6 * attribute prototype + noise * N(0, 1))`` followed by the 6 box
  values ``x1/W, y1/H, x2/W, y2/H, w/W, h/H`` of a random box; distractor regions (background stuff,
  never tagged or mentioned) fill the image up to ``regions`` (a range, default 10-20). Region order is
  shuffled.
* the detector-like tag list names each object's class, except that each is missed with probability
  ``tag_miss``; each distractor is tagged with a wrong class with probability ``tag_wrong``. Tags are
  sorted by a random confidence, wrong ones lower.
* each caption (``captions_per_image`` per image) follows one of several templates and mentions some of
  the image's objects, with or without their attribute, and its relations ("a red dog near a wooden
  table", "there is a dog on the grass", ...). Its concept tuples come from the same scene graph: (object)
  for every mentioned object, (object, attribute) when the attribute is said, (subject, predicate, object)
  for a stated relation; each knows the caption words it came from and its true region (the object's; the
  subject's for a triple).

Vocabulary (:class:`~mvptr_ds.data.vocab.VocabInfo`): words first (specials 0-4, template words, names),
``only_word_size`` = number of words; then every concept has its own id ``only_word_size + k`` (single-word
concepts do *not* reuse word ids, unlike the authors' vocabulary); ``concept_range`` covers all of them.

Raw content, for writers of the real formats (VinVL TSV, predictions.tsv, captions JSONL, id2phrase.json):

* ``world.images``: list of :class:`SceneImage` indexed by image id (``image_id``, ``split`` "train" or
  "held_out", ``width``, ``height``, ``boxes`` float32 ``[n, 4]`` pixel x1/y1/x2/y2, ``regions`` float32
  ``[n, 2054]``, ``objects`` (class name, attribute, region), ``relations`` (subject object index,
  predicate, object index), ``tags`` (class name, region, confidence)).
* ``world.captions``: list of :class:`SceneCaption` indexed by caption id = sample id (``image_id``,
  ``split``, ``text``, ``tuples`` as tuples of element strings, ``tuple_words`` word indices of each tuple
  in ``text.split()``, ``tuple_regions``).
* ``world.concepts``: ``{concept id: tuple of element strings}``; ``world.concept_ids`` the inverse.
* ``world.tokenizer`` (:class:`~mvptr_ds.data.vocab.WordTokenizer`), ``world.vocab``, ``world.train`` and
  ``world.held_out`` (indexable datasets of :class:`~mvptr_ds.data.types.Example`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from mvptr_ds.config import ConfigError
from mvptr_ds.data.types import Example
from mvptr_ds.data.vocab import SPECIAL_TOKENS, VocabInfo, WordTokenizer

NAMES_PATH = Path(__file__).resolve().parent / "assets" / "scene_names.json"
ROI_DIM = 2048
FEATURE_DIM = ROI_DIM + 6
ATTRIBUTE_WEIGHT = 0.6
NUM_STUFF = 8
CAPTION_ATTEMPTS = 4
# Words the caption templates use besides the names (fixed, so the vocabulary depends only on the sizes).
TEMPLATE_WORDS = ("a", "an", "the", "there", "is", "and", "photo", "of", "image", "showing", "scene", "with",
                  "can", "be", "seen")


@dataclass(frozen=True)
class SceneSpec:
    """Parameters of the scene world; ``parse_synthetic_source`` builds one from ``synthetic:k=v,...``."""

    seed: int = 0                 # draws the images and captions
    world_seed: int = 0           # draws the laws: prototypes, attribute sets, relation triples
    images: int = 512             # training images
    held_out: int = 64            # images held out for evaluation
    captions_per_image: int = 2
    objects: Tuple[int, int] = (3, 8)
    regions: Tuple[int, int] = (10, 20)
    classes: int = 48
    attributes: int = 24
    predicates: int = 10
    attributes_per_class: int = 4
    triples: int = 96
    noise: float = 0.5
    tag_miss: float = 0.15
    tag_wrong: float = 0.1

    def validate(self, names: Dict[str, List[str]]) -> None:
        def need(ok: bool, key: str, what: str):
            if not ok:
                raise ConfigError(f"--data synthetic: {key}={getattr(self, key)!r} {what}")

        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.world_seed >= 0, "world_seed", "must be >= 0")
        need(self.images >= 1, "images", "must be >= 1")
        need(self.held_out >= 0, "held_out", "must be >= 0")
        need(self.captions_per_image >= 1, "captions_per_image", "must be >= 1")
        need(1 <= self.objects[0] <= self.objects[1], "objects", "must be a range lo-hi with 1 <= lo <= hi")
        need(1 <= self.regions[0] <= self.regions[1], "regions", "must be a range lo-hi with 1 <= lo <= hi")
        need(self.objects[1] <= self.classes, "objects", f"needs at most classes={self.classes} objects")
        need(2 <= self.classes <= len(names["objects"]), "classes", f"must be in 2..{len(names['objects'])}")
        need(1 <= self.attributes <= len(names["attributes"]), "attributes",
             f"must be in 1..{len(names['attributes'])}")
        need(1 <= self.predicates <= len(names["predicates"]), "predicates",
             f"must be in 1..{len(names['predicates'])}")
        need(1 <= self.attributes_per_class <= self.attributes, "attributes_per_class",
             f"must be in 1..attributes={self.attributes}")
        need(1 <= self.triples <= self.classes * (self.classes - 1) * self.predicates, "triples",
             "must be >= 1 and at most classes*(classes-1)*predicates")
        need(0 <= self.noise < float("inf"), "noise", "must be a finite number >= 0")
        need(0 <= self.tag_miss <= 1, "tag_miss", "must be a probability")
        need(0 <= self.tag_wrong <= 1, "tag_wrong", "must be a probability")


def parse_synthetic_source(source: str) -> SceneSpec:
    """``"synthetic"`` or ``"synthetic:seed=3,images=200,objects=2-5,noise=0.3"`` -> :class:`SceneSpec`.

    Range keys (``objects``, ``regions``) take ``lo-hi`` or a single number. An unknown key or a value of
    the wrong type raises :class:`ConfigError` naming it.
    """
    head, _, rest = source.partition(":")
    if head != "synthetic":
        raise ConfigError(f"--data {source!r} is not a synthetic source (expected 'synthetic[:key=value,...]')")
    kinds = {f.name: f.type for f in dataclasses.fields(SceneSpec)}
    values = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if key not in kinds:
            raise ConfigError(f"--data synthetic: unknown key {key!r} (known: {', '.join(kinds)})")
        if not eq:
            raise ConfigError(f"--data synthetic: key {key!r} has no value (write {key}=VALUE)")
        try:
            if "Tuple" in str(kinds[key]):
                lo, _, hi = val.partition("-")
                values[key] = (int(lo), int(hi or lo))
            elif kinds[key] in ("int", int):
                values[key] = int(val)
            else:
                values[key] = float(val)
        except ValueError:
            raise ConfigError(f"--data synthetic: {key}={val!r} is not a valid "
                              f"{'range lo-hi' if 'Tuple' in str(kinds[key]) else kinds[key]}") from None
    return SceneSpec(**values)


def load_scene_names() -> Dict[str, List[str]]:
    """The packaged object/attribute/predicate names (``assets/scene_names.json``), most frequent first."""
    with open(NAMES_PATH) as f:
        return json.load(f)


@dataclass
class SceneObject:
    name: str
    attribute: str
    region: int


@dataclass
class SceneTag:
    name: str
    region: int
    conf: float


@dataclass
class SceneImage:
    image_id: int
    split: str
    width: int
    height: int
    boxes: np.ndarray             # [n, 4] float32, pixels x1, y1, x2, y2
    regions: np.ndarray           # [n, 2054] float32, ROI feature + 6 box values
    objects: List[SceneObject]
    relations: List[Tuple[int, str, int]]   # (subject object index, predicate, object object index)
    tags: List[SceneTag]


@dataclass
class SceneCaption:
    caption_id: int
    image_id: int
    split: str
    text: str
    tuples: List[Tuple[str, ...]]
    tuple_words: List[List[int]]  # indices into text.split() of the words each tuple came from
    tuple_regions: List[int]      # true region of each tuple in its image


@dataclass
class _Laws:
    classes: List[str]
    attributes: List[str]
    predicates: List[str]
    class_protos: np.ndarray      # [C, 2048]
    attr_protos: np.ndarray       # [A, 2048]
    stuff_protos: np.ndarray      # [NUM_STUFF, 2048]
    class_attrs: List[List[int]]  # attribute indices each class can take
    triples: List[Tuple[int, int, int]]  # (subject class, predicate, object class)


def _draw_laws(spec: SceneSpec, names: Dict[str, List[str]]) -> _Laws:
    rng = np.random.default_rng([spec.world_seed, 0x5CE7E])
    C, A, P = spec.classes, spec.attributes, spec.predicates
    class_attrs = [sorted(rng.choice(A, spec.attributes_per_class, replace=False).tolist()) for _ in range(C)]
    triples = set()
    while len(triples) < spec.triples:
        s, o = rng.choice(C, 2, replace=False)
        triples.add((int(s), int(rng.integers(P)), int(o)))
    return _Laws(names["objects"][:C], names["attributes"][:A], names["predicates"][:P],
                 rng.standard_normal((C, ROI_DIM), dtype=np.float32),
                 rng.standard_normal((A, ROI_DIM), dtype=np.float32),
                 rng.standard_normal((NUM_STUFF, ROI_DIM), dtype=np.float32),
                 class_attrs, sorted(triples))


class SceneDataset:
    """Indexable view of one split: ``len(ds)``, ``ds[i] -> Example`` (regions shared, not copied)."""

    def __init__(self, world: "SceneWorld", caption_ids: Sequence[int]):
        self.world = world
        self.caption_ids = np.asarray(caption_ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.caption_ids)

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for a split of {len(self)} captions")
        return self.world.example(int(self.caption_ids[i]))


def _vocabulary(spec: SceneSpec, laws: _Laws) -> Tuple[WordTokenizer, Dict[int, Tuple[str, ...]]]:
    """The world's word tokenizer and its concept ids (above the words): they follow from its laws alone."""
    tokenizer = WordTokenizer(list(TEMPLATE_WORDS) + laws.classes + laws.attributes + laws.predicates)
    tuples = [(c,) for c in laws.classes]
    tuples += [(laws.classes[c], laws.attributes[a]) for c in range(spec.classes) for a in laws.class_attrs[c]]
    tuples += [(laws.classes[s], laws.predicates[p], laws.classes[o]) for s, p, o in laws.triples]
    return tokenizer, {len(tokenizer) + k: t for k, t in enumerate(tuples)}


def scene_vocabulary(spec: SceneSpec) -> Tuple[WordTokenizer, Dict[int, Tuple[str, ...]]]:
    """``SceneWorld(spec)``'s tokenizer and concepts without drawing its images (milliseconds, not seconds)."""
    names = load_scene_names()
    spec.validate(names)
    return _vocabulary(spec, _draw_laws(spec, names))


class SceneWorld:
    """The generated world (see the module docstring for its attributes)."""

    def __init__(self, spec: SceneSpec = SceneSpec()):
        names = load_scene_names()
        spec.validate(names)
        self.spec = spec
        self._laws = laws = _draw_laws(spec, names)
        self.tokenizer, self.concepts = _vocabulary(spec, laws)
        base, tuples = len(self.tokenizer), list(self.concepts.values())
        self.concept_ids: Dict[Tuple[str, ...], int] = {t: i for i, t in self.concepts.items()}
        tok = self.tokenizer
        self.vocab = VocabInfo(vocab_size=base + len(tuples), only_word_size=base, pad_id=tok.pad_id,
                               cls_id=tok.cls_id, sep_id=tok.sep_id, mask_id=tok.mask_id,
                               concept_range=(base, base + len(tuples)), word_range=(len(SPECIAL_TOKENS), base))
        rng = np.random.default_rng([spec.seed, 0x1A6E5])
        self.images: List[SceneImage] = []
        self.captions: List[SceneCaption] = []
        for split, count in (("train", spec.images), ("held_out", spec.held_out)):
            for _ in range(count):
                image = self._draw_image(rng, len(self.images), split)
                self.images.append(image)
                said = set()
                for _ in range(spec.captions_per_image):
                    for _attempt in range(CAPTION_ATTEMPTS):  # prefer captions the image does not have yet
                        cap = self._draw_caption(rng, image, len(self.captions))
                        if cap.text not in said:
                            break
                    said.add(cap.text)
                    self.captions.append(cap)
        self._caption_ids = [np.asarray(tok.encode(c.text), dtype=np.int64) for c in self.captions]
        self._tag_ids = [np.asarray(tok.encode(" ".join(t.name for t in im.tags)), dtype=np.int64)
                         for im in self.images]
        by_split = {"train": [], "held_out": []}
        for c in self.captions:
            by_split[c.split].append(c.caption_id)
        self.train = SceneDataset(self, by_split["train"])
        self.held_out = SceneDataset(self, by_split["held_out"])

    def example(self, caption_id: int) -> Example:
        """The :class:`Example` of caption ``caption_id`` (its sample id)."""
        cap = self.captions[caption_id]
        image = self.images[cap.image_id]
        return Example(sample_id=cap.caption_id, image_id=cap.image_id,
                       caption_ids=self._caption_ids[caption_id].tolist(),
                       concept_ids=[self.concept_ids[t] for t in cap.tuples],
                       concept_word_links=[list(w) for w in cap.tuple_words],
                       tag_ids=self._tag_ids[cap.image_id].tolist(), regions=image.regions,
                       concept_regions=list(cap.tuple_regions))

    def _draw_image(self, rng: np.random.Generator, image_id: int, split: str) -> SceneImage:
        spec, laws = self.spec, self._laws
        n_obj = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
        classes: List[int] = []
        rel_classes: List[Tuple[int, int, int]] = []
        for _ in range(1 + int(rng.random() < 0.5)):
            s, p, o = laws.triples[int(rng.integers(len(laws.triples)))]
            new = [c for c in (s, o) if c not in classes]
            if len(classes) + len(new) <= n_obj and (s, p, o) not in rel_classes:
                classes += new
                rel_classes.append((s, p, o))
        rest = [c for c in range(spec.classes) if c not in classes]
        classes += [rest[k] for k in rng.choice(len(rest), n_obj - len(classes), replace=False)]
        attrs = [laws.class_attrs[c][int(rng.integers(spec.attributes_per_class))] for c in classes]
        n_reg = max(n_obj, int(rng.integers(spec.regions[0], spec.regions[1] + 1)))
        slot = rng.permutation(n_reg)  # object i -> region slot[i]; slots >= n_obj are distractors
        width, height = int(rng.integers(480, 641)), int(rng.integers(360, 481))
        wh = rng.uniform(0.1, 0.6, (n_reg, 2)) * (width, height)
        xy = rng.uniform(0.0, 1.0, (n_reg, 2)) * ((width, height) - wh)
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)  # [n_reg, 4]
        proto = np.empty((n_reg, ROI_DIM), dtype=np.float32)
        for i in range(n_reg):
            if i < n_obj:
                proto[slot[i]] = laws.class_protos[classes[i]] + ATTRIBUTE_WEIGHT * laws.attr_protos[attrs[i]]
            else:
                proto[slot[i]] = laws.stuff_protos[int(rng.integers(NUM_STUFF))]
        roi = np.maximum(proto + spec.noise * rng.standard_normal((n_reg, ROI_DIM), dtype=np.float32), 0.0)
        size = np.array([width, height, width, height], dtype=np.float32)
        box6 = np.concatenate([boxes / size, (boxes[:, 2:] - boxes[:, :2]) / size[:2]], axis=1)  # [n_reg, 6]
        regions = np.concatenate([roi, box6], axis=1).astype(np.float32)  # [n_reg, 2054]
        objects = [SceneObject(laws.classes[c], laws.attributes[a], int(slot[i]))
                   for i, (c, a) in enumerate(zip(classes, attrs))]
        relations = [(classes.index(s), laws.predicates[p], classes.index(o)) for s, p, o in rel_classes]
        tags = [SceneTag(ob.name, ob.region, float(rng.uniform(0.5, 1.0)))
                for ob in objects if rng.random() >= spec.tag_miss]
        absent = [c for c in range(spec.classes) if c not in classes]
        for i in range(n_obj, n_reg):
            if rng.random() < spec.tag_wrong:
                tags.append(SceneTag(laws.classes[int(rng.choice(absent))], int(slot[i]),
                                     float(rng.uniform(0.2, 0.6))))
        tags.sort(key=lambda t: -t.conf)
        return SceneImage(image_id, split, width, height, boxes, regions, objects, relations, tags)

    def _draw_caption(self, rng: np.random.Generator, image: SceneImage, caption_id: int) -> SceneCaption:
        builder = _CaptionBuilder(image, rng)
        objs = rng.permutation(len(image.objects)).tolist()
        if image.relations and rng.random() < 0.7:
            s, pred, o = image.relations[int(rng.integers(len(image.relations)))]
            others = [i for i in objs if i not in (s, o)]
            form = int(rng.integers(4))
            if form == 1:
                builder.say("there is")
            builder.relation(s, pred, o)
            if form == 2 and others:
                builder.say("and")
                builder.noun_phrase(others[0])
            elif form == 3:
                builder.say("can be seen")
        else:
            form = int(rng.integers(4))
            if form == 0:
                builder.say("the")
                builder.noun_phrase(objs[0], article=False, attribute=False)
                builder.say("is")
                builder.attribute_of(objs[0])
            else:
                builder.say(("a photo of", "an image showing", "a scene with")[form - 1])
                k = min(len(objs), int(rng.integers(1, 4)))
                for j, i in enumerate(objs[:k]):
                    if j:
                        builder.say("and")
                    builder.noun_phrase(i)
        return SceneCaption(caption_id, image.image_id, image.split, " ".join(builder.words),
                            [t for t, _, _ in builder.tuples], [w for _, w, _ in builder.tuples],
                            [r for _, _, r in builder.tuples])


@dataclass
class _CaptionBuilder:
    """Accumulates caption words and the concept tuples they express, with word indices and regions."""

    image: SceneImage
    rng: np.random.Generator
    words: List[str] = field(default_factory=list)
    tuples: List[Tuple[Tuple[str, ...], List[int], int]] = field(default_factory=list)
    name_words: Dict[int, List[int]] = field(default_factory=dict)

    def say(self, text: str) -> List[int]:
        start = len(self.words)
        self.words += text.split()
        return list(range(start, len(self.words)))

    def noun_phrase(self, i: int, article: bool = True, attribute: bool = None) -> None:
        """``[a|an|the] [attribute] name`` for object ``i``, adding (name) and (name, attribute) tuples."""
        ob = self.image.objects[i]
        if attribute is None:
            attribute = self.rng.random() < 0.6
        if article:
            first = ob.attribute if attribute else ob.name
            self.say("the" if self.rng.random() < 0.2 else ("an" if first[0] in "aeiou" else "a"))
        attr_words = self.say(ob.attribute) if attribute else []
        self.name_words[i] = self.say(ob.name)
        self.tuples.append(((ob.name,), self.name_words[i], ob.region))
        if attribute:
            self.tuples.append(((ob.name, ob.attribute), attr_words + self.name_words[i], ob.region))

    def attribute_of(self, i: int) -> None:
        ob = self.image.objects[i]
        attr_words = self.say(ob.attribute)
        self.tuples.append(((ob.name, ob.attribute), self.name_words[i] + attr_words, ob.region))

    def relation(self, s: int, pred: str, o: int) -> None:
        """``NP(s) predicate NP(o)``; the triple follows the subject's tuples, linked to all three parts."""
        self.noun_phrase(s)
        at = len(self.tuples)
        pred_words = self.say(pred)
        self.noun_phrase(o)
        subj, obj = self.image.objects[s], self.image.objects[o]
        self.tuples.insert(at, ((subj.name, pred, obj.name), self.name_words[s] + pred_words + self.name_words[o],
                                subj.region))
