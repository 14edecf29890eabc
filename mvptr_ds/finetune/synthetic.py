"""Small versions of the downstream tasks, drawn from the built-in scene world (``--data synthetic[:...]``).

The world's images come with their scene graph (objects with one attribute each, relations) and boxes, so
every task has exact ground truth. The texts use only the world's own vocabulary (it has no question
words), so a model pre-trained on the world loads with the same embedding table. Per image, drawn from
``seed`` (training images train, held-out images evaluate):

* **VQA** (3 questions): existence ``"is there a dog"`` -> ``yes``/``no`` (half of them about a class the
  image lacks); attribute ``"the dog is"`` -> the object's attribute; count ``"image of red"`` -> how many
  objects have that attribute (``"0"``, ``"1"``, ...; sometimes an attribute no object has). Answer
  vocabulary: yes, no, the attributes, the counts 0..max objects. Each answer has soft score 1.
* **SNLI-VE** (3 hypotheses, one per label): entailment ``"the dog is red"`` (true attribute) or ``"there
  is a dog"``; contradiction: a wrong attribute of a present object, or a class the image lacks;
  neutral: ``"the dog near the table"``, a relation between two present objects that the scene graph does
  not state (region features carry no relation information, so the image neither confirms nor refutes it).
* **RefCOCO** (up to 2 expressions): ``"the red dog"`` or ``"the dog"`` naming one object; its box is the
  target; every detected region's IoU with it is the regression target (the object's own region has IoU 1).
* **Retrieval**: the world's image-caption pairs themselves.

Concepts of each text (objects, (object, attribute) pairs, relation triples of the world) are linked to
their words as in captions, so the text stream has the same shape as in pre-training.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from mvptr_ds.data.synthetic import SceneImage, SceneWorld
from mvptr_ds.data.types import Example
from mvptr_ds.finetune.batching import TaskExample
from mvptr_ds.finetune.metrics import box_iou

import torch


class _Lexicon:
    """The world's names, recovered from its concept table (no private state of the world is read)."""

    def __init__(self, world: SceneWorld):
        self.classes = sorted({t[0] for t in world.concepts.values() if len(t) == 1})
        self.attributes = sorted({t[1] for t in world.concepts.values() if len(t) == 2})
        self.class_attrs: Dict[str, List[str]] = {}
        for t in world.concepts.values():
            if len(t) == 2:
                self.class_attrs.setdefault(t[0], []).append(t[1])
        self.predicates = sorted({t[1] for t in world.concepts.values() if len(t) == 3})


class _Text:
    """Builds a text word by word with its concept tuples and their word indices."""

    def __init__(self, world: SceneWorld):
        self.world, self.words, self.tuples = world, [], []

    def say(self, text: str) -> List[int]:
        start = len(self.words)
        self.words += text.split()
        return list(range(start, len(self.words)))

    def concept(self, t: Tuple[str, ...], words: List[int]) -> None:
        if t in self.world.concept_ids:
            self.tuples.append((t, words))

    def example(self, sample_id: int, image: SceneImage) -> Example:
        tok = self.world.tokenizer
        return Example(sample_id=sample_id, image_id=image.image_id,
                       caption_ids=tok.encode(" ".join(self.words)),
                       concept_ids=[self.world.concept_ids[t] for t, _ in self.tuples],
                       concept_word_links=[list(w) for _, w in self.tuples],
                       tag_ids=tok.encode(" ".join(t.name for t in image.tags)), regions=image.regions)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def vqa_answers(world: SceneWorld) -> List[str]:
    """The answer vocabulary of the synthetic VQA task (index = answer id)."""
    return ["yes", "no"] + _Lexicon(world).attributes + [str(k) for k in range(world.spec.objects[1] + 1)]


def _images(world: SceneWorld, split: str) -> List[SceneImage]:
    return [im for im in world.images if im.split == split]


def vqa_examples(world: SceneWorld, split: str, seed: int) -> List[TaskExample]:
    lex, answers = _Lexicon(world), vqa_answers(world)
    index = {a: i for i, a in enumerate(answers)}
    rng = np.random.default_rng([seed, 0x7A5, 0 if split == "train" else 1])
    out: List[TaskExample] = []
    for im in _images(world, split):
        present = [ob.name for ob in im.objects]
        absent = [c for c in lex.classes if c not in present]
        ob = im.objects[int(rng.integers(len(im.objects)))]
        # existence
        t = _Text(world)
        if absent and rng.random() < 0.5:
            name, answer = absent[int(rng.integers(len(absent)))], "no"
        else:
            name, answer = ob.name, "yes"
        t.say("is there")
        t.say(_article(name))
        t.concept((name,), t.say(name))
        out.append(TaskExample(t.example(len(out), im), answers={index[answer]: 1.0}))
        # attribute
        t = _Text(world)
        t.say("the")
        t.concept((ob.name,), t.say(ob.name))
        t.say("is")
        out.append(TaskExample(t.example(len(out), im), answers={index[ob.attribute]: 1.0}))
        # count
        held = [o.attribute for o in im.objects]
        attr = (held[int(rng.integers(len(held)))] if rng.random() < 0.75
                else lex.attributes[int(rng.integers(len(lex.attributes)))])
        t = _Text(world)
        t.say("image of")
        t.say(attr)
        out.append(TaskExample(t.example(len(out), im), answers={index[str(held.count(attr))]: 1.0}))
    return out


def snli_ve_examples(world: SceneWorld, split: str, seed: int) -> List[TaskExample]:
    lex = _Lexicon(world)
    rng = np.random.default_rng([seed, 0x5E1, 0 if split == "train" else 1])
    out: List[TaskExample] = []
    for im in _images(world, split):
        present = [ob.name for ob in im.objects]
        absent = [c for c in lex.classes if c not in present]
        ob = im.objects[int(rng.integers(len(im.objects)))]
        # entailment (0)
        t = _Text(world)
        if rng.random() < 0.5:
            t.say("the")
            name_w = t.say(ob.name)
            t.say("is")
            t.concept((ob.name,), name_w)
            t.concept((ob.name, ob.attribute), name_w + t.say(ob.attribute))
        else:
            t.say("there is a" if _article(ob.name) == "a" else "there is an")
            t.concept((ob.name,), t.say(ob.name))
        out.append(TaskExample(t.example(len(out), im), label=0))
        # neutral (1): an unstated relation between two present objects
        pairs = [(s, o) for s in range(len(im.objects)) for o in range(len(im.objects)) if s != o]
        stated = {(s, p, o) for s, p, o in im.relations}
        options = [(s, p, o) for s, o in pairs for p in lex.predicates if (s, p, o) not in stated]
        if options:
            s, p, o = options[int(rng.integers(len(options)))]
            sn, on = im.objects[s].name, im.objects[o].name
            t = _Text(world)
            t.say("the")
            sw = t.say(sn)
            pw = t.say(p)
            t.say("the")
            ow = t.say(on)
            t.concept((sn, p, on), sw + pw + ow)
            t.concept((sn,), sw)
            t.concept((on,), ow)
            out.append(TaskExample(t.example(len(out), im), label=1))
        # contradiction (2): a wrong attribute, or a class the image lacks
        wrong = [a for a in lex.class_attrs.get(ob.name, []) if a != ob.attribute] or \
                [a for a in lex.attributes if a != ob.attribute]
        t = _Text(world)
        if (rng.random() < 0.5 or not absent) and wrong:
            a = wrong[int(rng.integers(len(wrong)))]
            t.say("the")
            name_w = t.say(ob.name)
            t.say("is")
            t.concept((ob.name,), name_w)
            t.concept((ob.name, a), name_w + t.say(a))
        else:
            name = absent[int(rng.integers(len(absent)))]
            t.say("there is")
            t.say(_article(name))
            t.concept((name,), t.say(name))
        out.append(TaskExample(t.example(len(out), im), label=2))
    return out


def refcoco_examples(world: SceneWorld, split: str, seed: int) -> List[TaskExample]:
    rng = np.random.default_rng([seed, 0x2EF, 0 if split == "train" else 1])
    out: List[TaskExample] = []
    for im in _images(world, split):
        boxes = torch.from_numpy(im.boxes)  # (R, 4)
        for k in rng.permutation(len(im.objects))[:2]:
            ob = im.objects[int(k)]
            t = _Text(world)
            t.say("the")
            attr_w = t.say(ob.attribute) if rng.random() < 0.5 else []
            name_w = t.say(ob.name)
            t.concept((ob.name,), name_w)
            if attr_w:
                t.concept((ob.name, ob.attribute), attr_w + name_w)
            iou = box_iou(boxes, boxes[ob.region][None, :]).float().numpy()  # (R,)
            out.append(TaskExample(t.example(len(out), im), region_iou=iou))
    return out


def retrieval_examples(world: SceneWorld, split: str) -> List[TaskExample]:
    ds = world.train if split == "train" else world.held_out
    return [TaskExample(ds[i]) for i in range(len(ds))]


BUILDERS = {"vqa": vqa_examples, "snli_ve": snli_ve_examples, "refcoco": refcoco_examples}


def task_examples(world: SceneWorld, task: str, split: str, seed: int) -> Sequence[TaskExample]:
    """``split``: "train" (the world's training images) or "held_out"."""
    if task == "retrieval":
        return retrieval_examples(world, split)
    return BUILDERS[task](world, split, seed)
