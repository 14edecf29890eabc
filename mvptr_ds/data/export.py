"""Write a synthetic scene world in the real formats, so the real-data path runs end to end.

``write_real_formats(world, out_dir)`` produces the layout :class:`~mvptr_ds.data.real_dataset.RealDataset`
reads (``features.tsv`` + ``features.lineidx`` + ``imageid2idx.json``, ``predictions.tsv``,
``captions.jsonl``, ``id2phrase.json``) plus ``tokenizer/`` (``vocab.txt`` + ``tokenizer_config.json``, a
lower-casing BERT word-piece tokenizer whose ids equal the world's word ids). Image ids are the world's
integer ids as strings; caption records carry the world's tuples as ``phrases`` (omit them with
``phrases=False`` to exercise concept extraction) and the ``split`` ("train" / "held_out").
"""
from __future__ import annotations

import json
import os

from mvptr_ds.files import atomic_write_json, atomic_write_lines

from .caption_files import write_id2phrase
from .readers import encode_feature_row, write_lineidx


def write_real_formats(world, out_dir: str, phrases: bool = True) -> dict:
    """Write ``world`` (a :class:`~mvptr_ds.data.synthetic.SceneWorld`) under ``out_dir``.

    Returns:
        summary: ``out``, ``images``, ``captions``, ``regions``, ``concepts``, ``tokenizer`` path.
    """
    os.makedirs(out_dir, exist_ok=True)
    offsets, pos, regions = [], 0, 0
    with open(os.path.join(out_dir, "features.tsv"), "wb") as f:
        for im in world.images:
            line = encode_feature_row(str(im.image_id), im.regions)        # regions [n, 2054]
            offsets.append(pos)
            f.write(line)
            pos += len(line)
            regions += im.regions.shape[0]
    write_lineidx(os.path.join(out_dir, "features.lineidx"), offsets)
    with open(os.path.join(out_dir, "imageid2idx.json"), "w", encoding="utf-8") as f:
        json.dump({str(im.image_id): k for k, im in enumerate(world.images)}, f)
    with open(os.path.join(out_dir, "predictions.tsv"), "w", encoding="utf-8") as f:
        for im in world.images:
            objects = [{"class": t.name, "rect": [float(x) for x in im.boxes[t.region]], "conf": t.conf}
                       for t in im.tags]
            rec = {"objects": objects, "image_h": im.height, "image_w": im.width}
            f.write(f"{im.image_id}\t{json.dumps(rec)}\n")
    with open(os.path.join(out_dir, "captions.jsonl"), "w", encoding="utf-8") as f:
        for c in world.captions:
            rec = {"image_id": str(c.image_id), "caption": c.text, "split": c.split}
            if phrases:
                rec["phrases"] = [list(t) for t in c.tuples]
            f.write(json.dumps(rec) + "\n")
    tok_dir = write_word_vocabulary(out_dir, world.tokenizer, world.concepts)
    return {"out": out_dir, "images": len(world.images), "captions": len(world.captions), "regions": regions,
            "concepts": len(world.concepts), "tokenizer": tok_dir}


def write_word_vocabulary(out_dir: str, tokenizer, concepts) -> str:
    """``tokenizer/`` (a lower-casing BERT word-piece tokenizer whose ids equal ``tokenizer``'s word ids) and
    ``id2phrase.json`` (``concepts``) of a synthetic world under ``out_dir``; returns the tokenizer folder."""
    write_id2phrase(os.path.join(out_dir, "id2phrase.json"), concepts)
    tok_dir = os.path.join(out_dir, "tokenizer")
    atomic_write_lines(os.path.join(tok_dir, "vocab.txt"), (w + "\n" for w in tokenizer.words))
    atomic_write_json(os.path.join(tok_dir, "tokenizer_config.json"),
                      {"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    return tok_dir


def write_vocabulary(out_dir: str, data_cfg) -> None:
    """The tokenizer (``tokenizer/``) and concept vocabulary (``id2phrase.json``) the data of ``data_cfg`` is
    encoded with, under ``out_dir`` (a model folder is then readable without its data): the built-in world's,
    or copies of a data directory's (``data.tokenizer`` or ``DIR/tokenizer``, ``DIR/id2phrase.json``)."""
    import shutil

    from .pipeline import is_synthetic
    from .synthetic import parse_synthetic_source, scene_vocabulary

    source = data_cfg.source
    if is_synthetic(source):
        write_word_vocabulary(out_dir, *scene_vocabulary(parse_synthetic_source(source)))
        return
    tok_dir = data_cfg.tokenizer or os.path.join(source, "tokenizer")
    copies = [(os.path.join(tok_dir, name), os.path.join(out_dir, "tokenizer", name))
              for name in (sorted(os.listdir(tok_dir)) if os.path.isdir(tok_dir) else [])]
    copies.append((os.path.join(source, "id2phrase.json"), os.path.join(out_dir, "id2phrase.json")))
    for src, dst in copies:
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)  # the file's bytes; the mode follows the umask, as for every file we write


def synth(out: str, data: str = "synthetic", phrases: bool = True) -> dict:
    """CLI body of ``synth --out DIR [--data synthetic:key=value,...]``: build the world, write it."""
    from .synthetic import SceneWorld, parse_synthetic_source

    return write_real_formats(SceneWorld(parse_synthetic_source(data)), out, phrases=phrases)
