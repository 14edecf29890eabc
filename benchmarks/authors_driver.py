"""Times the authors' MVPTR pre-training step, in a process of its own: the ``--baseline authors`` side of
``throughput.py``.

It imports the authors' released code from ``--authors_repo`` (``oscar/`` and the vendored
``transformers/pytorch_transformers/``; that package is named ``transformers`` and would clash with the real
one, hence a process of its own) and builds ``BiBertImgForPreTraining`` as their timing harness does
(``../shared/peer/authors_step.py``): ``BertConfig`` with ``vocab_size`` rows of which ``only_word_size`` word
pieces, ``num_hidden_layers`` = 2 x the layers of one encoder (their three encoders get half of it each),
``img_feature_dim=2054``, ``faster_r-cnn`` features, no image LayerNorm, ``torchscript=True`` (their
``tie_weights`` raises on current torch otherwise; the two MLM decoders are then clones of the word
embeddings, not tied), ``qa_answer_size=2``, ``num_contrast_classes=2``, hidden dropout 0.1; optimizer
``torch.optim.AdamW(lr=1e-5)``. Nothing of their code is copied here: it is imported at run time.

A step: the batch (fixed padding: text ``max_seq_length + max_phrases`` = 40, tags 20, regions 50, filled
from ``authors_data.draw_sample`` by sample index; 15% of caption words and tags replaced by [MASK] with
their labels, as the harness) is built untimed, then ``forward`` (``model(**batch)``, all their losses),
``backward`` (``loss.backward()``) and ``optimizer`` (``opt.step(); opt.zero_grad(set_to_none=True)``) are
timed, with a device synchronisation at each boundary on CUDA.

Protocol (``throughput.AuthorsProcess`` speaks it): the spec comes as ``--spec JSON``; the driver answers one
JSON line on stdout when its model is built (``{"ready": true, "parameters": ..}``, or ``{"error": ..}`` when
the authors' code cannot be imported), then for each JSON line on stdin one JSON line back:
``{"cmd": "step", "ids": [..]}`` -> ``{"forward": s, "backward": s, "optimizer": s, "step": s, "loss": x}``;
``{"cmd": "reset_peak"}``, ``{"cmd": "stats"}`` (peak memory), ``{"cmd": "quit"}``. Everything else the
process prints goes to stderr. Alone, ``--steps N`` times N steps (samples 0.., the first untimed) and prints
one JSON summary:

    python benchmarks/authors_driver.py --authors_repo ../shared/peer/mvp_pytorch --steps 3 \\
        --spec '{"hidden": 64, "heads": 2, "layers": 2, "micro_batch": 4}'
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# The harness's settings; the spec overrides the sizes.
DEFAULTS = {
    "hidden": 768, "heads": 12, "layers": 6, "intermediate": None, "max_position": 512, "dropout": 0.1,
    "vocab_size": 86051, "only_word_size": 30522, "ids": None, "text_len": 40, "tag_len": 20, "region_len": 50,
    "micro_batch": 8, "lr": 1e-5, "seed": 0, "threads": None, "device": "cpu", "precision": "fp32",
    "data_seed": 0, "mask_prob": 0.15, "img_layernorm": 0,
}


def build_model(spec):
    """``BiBertImgForPreTraining`` and its config, as the authors' harness builds it (module doc)."""
    from oscar.modeling.modeling_vlbert import BiBertImgForPreTraining
    from transformers.pytorch_transformers.modeling_bert import BertConfig

    h = spec["hidden"]
    cfg = BertConfig(vocab_size_or_config_json_file=spec["vocab_size"], hidden_size=h,
                     num_hidden_layers=2 * spec["layers"], num_attention_heads=spec["heads"],
                     intermediate_size=spec["intermediate"] or 4 * h,
                     max_position_embeddings=spec["max_position"])
    for k, v in dict(img_feature_dim=2054, img_feature_type="faster_r-cnn", use_img_layernorm=spec["img_layernorm"],
                     img_layer_norm_eps=1e-12, only_word_size=spec["only_word_size"], torchscript=True,
                     qa_answer_size=2, num_contrast_classes=2, hidden_dropout_prob=spec["dropout"]).items():
        setattr(cfg, k, v)
    return BiBertImgForPreTraining(cfg), cfg


def make_batch(spec, ids_space, sample_ids, step_seed: int):
    """The harness's input dict for the samples ``sample_ids`` (fixed padding; masking seeded per sample)."""
    import numpy as np
    import torch

    from authors_data import draw_sample

    B, Lt, Lg, Lr = len(sample_ids), spec["text_len"], spec["tag_len"], spec["region_len"]
    sp = ids_space
    ids_a = torch.full((B, Lt), sp.pad_id, dtype=torch.long)
    ma = torch.zeros(B, Lt, dtype=torch.long)
    la = torch.full((B, Lt), -1, dtype=torch.long)
    ids_b = torch.full((B, Lg), sp.pad_id, dtype=torch.long)
    mb = torch.zeros(B, Lg + Lr, dtype=torch.long)
    lb = torch.full((B, Lg + Lr), -1, dtype=torch.long)
    feats = torch.zeros(B, Lr, 2054)
    pidx, iidx = [], []
    for i, sid in enumerate(sample_ids):
        s = draw_sample(sp, spec["data_seed"], sid)
        words = s["caption_ids"].tolist()
        concepts = s["concept_ids"].tolist()[:max(0, Lt - 2 - len(words))]
        words = words[:Lt - 2 - len(concepts)]
        tags = s["tag_ids"].tolist()[:Lg - 2]
        regions = s["regions"][:Lr]
        rng = np.random.default_rng([int(spec["seed"]), 17, int(step_seed), int(sid)])
        seq = [sp.cls_id] + words + concepts + [sp.sep_id]
        ids_a[i, :len(seq)] = torch.tensor(seq)
        ma[i, :len(seq)] = 1
        for j in np.flatnonzero(rng.random(len(words)) < spec["mask_prob"]) + 1:
            la[i, j], ids_a[i, j] = seq[j], sp.mask_id
        pidx.append([1 + len(words), 1 + len(words) + len(concepts)])
        t = [sp.cls_id] + tags + [sp.sep_id]
        ids_b[i, :len(t)] = torch.tensor(t)
        mb[i, :len(t)] = 1
        for j in np.flatnonzero(rng.random(len(tags)) < spec["mask_prob"]) + 1:
            lb[i, j], ids_b[i, j] = t[j], sp.mask_id
        nr = regions.shape[0]
        feats[i, :nr] = torch.from_numpy(regions)
        mb[i, Lg:Lg + nr] = 1
        iidx.append([Lt, Lt + nr])
    return dict(input_ids_a=ids_a, attention_mask_a=ma, token_type_ids_a=torch.zeros_like(ids_a),
                masked_lm_labels_a=la, input_ids_b=ids_b, attention_mask_b=mb,
                token_type_ids_b=torch.ones_like(ids_b), masked_lm_labels_b=lb, img_feats=feats,
                max_tag_length=Lg, phrase_index=torch.tensor(pidx), img_index=torch.tensor(iidx))


def peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class AuthorsStep:
    """The authors' model, optimizer and timed step (module doc)."""

    def __init__(self, spec):
        import torch

        from authors_data import AUTHORS_IDS, IdSpace

        self.spec = spec
        if spec["threads"]:
            torch.set_num_threads(int(spec["threads"]))
        self.device = torch.device(spec["device"])
        self.ids = IdSpace.from_dict(spec["ids"]) if spec["ids"] else AUTHORS_IDS
        torch.manual_seed(spec["seed"])
        random.seed(spec["seed"])  # their WPG draws its negative image with random.choice
        self.model, self.cfg = build_model(spec)
        self.model.to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec["lr"])
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["precision"]]
        self.scaler = torch.amp.GradScaler(self.device.type) if spec["precision"] == "fp16" else None
        self.steps = 0

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _sync(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, sample_ids):
        import torch

        batch = make_batch(self.spec, self.ids, sample_ids, self.steps)
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        self.steps += 1
        self._sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.model(**batch)
        loss = out[0]
        self._sync()
        t1 = time.perf_counter()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._sync()
        t2 = time.perf_counter()
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0,
                "loss": float(loss.detach().float()), "samples": len(sample_ids)}

    def hello(self):
        import torch
        return {"ready": True, "parameters": self.parameters, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "device": str(self.device), "precision": self.spec["precision"],
                "vocab_size": self.cfg.vocab_size, "only_word_size": self.cfg.only_word_size,
                "num_hidden_layers": self.cfg.num_hidden_layers, "hidden_size": self.cfg.hidden_size,
                "fixed_lengths": [self.spec["text_len"], self.spec["tag_len"], self.spec["region_len"]]}


def serve(stepper, inp, out) -> None:
    def send(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    for line in inp:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.get("cmd")
        if cmd == "step":
            send(stepper.step([int(i) for i in msg["ids"]]))
        elif cmd == "reset_peak":
            reset_peak()
            send({"ok": True})
        elif cmd == "stats":
            send({"peak_memory_bytes": peak_rss(), "peak_memory_kind": "cpu_peak_rss", "steps": stepper.steps})
        elif cmd == "quit":
            send({"ok": True})
            return
        else:
            send({"error": f"unknown command {cmd!r}"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors_repo", required=True, help="the authors' repository (holds oscar/ and transformers/)")
    p.add_argument("--spec", default="{}", help="JSON: sizes, vocabulary, lengths, micro batch, threads (DEFAULTS)")
    p.add_argument("--steps", type=int, default=0, help="run alone: time this many steps, print a JSON summary")
    args = p.parse_args(argv)
    spec = dict(DEFAULTS)
    spec.update(json.loads(args.spec))
    unknown = set(spec) - set(DEFAULTS)
    if unknown:
        p.error(f"unknown spec keys: {', '.join(sorted(unknown))}")
    # The protocol owns the real stdout; whatever else writes to fd 1 (their code, C libraries) goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    repo = os.path.abspath(args.authors_repo)
    sys.path.insert(0, repo)
    if HERE not in sys.path:
        sys.path.insert(1, HERE)
    try:
        stepper = AuthorsStep(spec)
    except ImportError as exc:  # their package's own dependencies (six, boto3, anytree) or the repo layout
        proto.write(json.dumps({"error": f"cannot import the authors' code from {repo}: "
                                         f"{type(exc).__name__}: {exc}", "kind": "import"}) + "\n")
        return 3
    if args.steps:
        B = spec["micro_batch"]
        times = [stepper.step(list(range(k * B, (k + 1) * B))) for k in range(args.steps)]
        timed = times[1:] or times

        def med(xs):
            xs = sorted(xs)
            n = len(xs)
            return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

        summary = stepper.hello()
        summary.update({k: med([t[k] for t in timed]) for k in ("forward", "backward", "optimizer", "step")})
        summary.update({"steps": len(timed), "loss_last": times[-1]["loss"], "peak_memory_bytes": peak_rss()})
        proto.write(json.dumps(summary) + "\n")
        return 0
    proto.write(json.dumps(stepper.hello()) + "\n")
    proto.flush()
    serve(stepper, sys.stdin, proto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
