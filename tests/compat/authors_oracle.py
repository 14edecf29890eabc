"""The authors' pre-training model as an oracle, run in a process of its own (``tests/compat/test_fidelity.py``).

    python tests/compat/authors_oracle.py PEER_DIR IN.pt OUT.pt

``PEER_DIR`` is ``../shared/peer/mvp_pytorch`` (their ``oscar/`` and vendored ``transformers/``, a package that
shadows the real ``transformers``: hence a process of its own). Nothing of their code is copied here; it is
imported. ``IN.pt`` (plain tensors, lists, numbers and strings; read with ``weights_only``) holds:

* ``config``: their BertConfig fields; ``seed``: the seed of their initialisation and of their random choices;
* ``inputs``: their forward's keyword arguments for one batch (``input_ids_a`` ... ``phrase_index``,
  ``img_index``, ``max_tag_length``);
* ``export_dir`` (optional): a checkpoint written by this project's reverse converter, loaded with their
  ``BiBertImgForPreTraining.from_pretrained``.

``OUT.pt`` holds their freshly initialised ``state_dict``; the five losses of one training forward (their
order: ``mcr`` (vis_mlm), ``vsc``, ``mlm``, ``itm``, ``wpg``) and ``total``; each loss's gradient w.r.t. every
parameter (``grads[loss][name]``, absent where their autograd gives none); the random choices their forward made,
recorded as made (``randperm``: ITM's side split; ``randint``: WPG's top-3 picks, one call per ``t2i_sim`` with
phrases; ``choice``: WPG's negative pair per row); ITM's mined pairs (``hard_text``, ``hard_image``); and, with
``export_dir``, the loaded model's keys report and its outputs on the same inputs in eval mode.
"""
import random
import sys

import torch

LOSSES = ("mcr", "vsc", "mlm", "itm", "wpg")


def record(module, name, log):
    """Replace ``module.name`` by a wrapper that appends each result to ``log``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        log.append(out.clone() if isinstance(out, torch.Tensor) else out)
        return out

    setattr(module, name, wrapper)


def outputs_of(model, inputs):
    """Encoder outputs, similarity and head logits of ``model`` in eval mode (no negatives mined)."""
    model.eval()
    lt, lg = inputs["input_ids_a"].shape[1], inputs["max_tag_length"]
    keys = ("input_ids_a", "attention_mask_a", "token_type_ids_a", "input_ids_b", "attention_mask_b",
            "token_type_ids_b", "img_feats", "max_tag_length")
    with torch.no_grad():
        (seq, pooled, _, _), (txt, vis, sim), _ = model.bert(**{k: inputs[k] for k in keys}, encode_hn=False)
        return {"text_encoder": txt, "visual_encoder": vis, "cross_encoder": seq, "pooled": pooled,
                "similarity": sim, "mlm_logits": model.cls.predictions(seq[:, :lt]),
                "mcr_logits": model.half_mlm(vis[:, :lg]), "itm_logits": model.cls.seq_relationship(pooled)}


def main(peer, src, dst):
    sys.path.insert(0, peer)
    from oscar.modeling.modeling_vlbert import BiBertImgForPreTraining
    from transformers.pytorch_transformers.modeling_bert import BertConfig

    spec = torch.load(src, weights_only=True)
    cfg = BertConfig(vocab_size_or_config_json_file=spec["config"]["vocab_size"])
    for k, v in spec["config"].items():
        setattr(cfg, k, v)
    torch.manual_seed(spec["seed"])
    random.seed(spec["seed"])
    model = BiBertImgForPreTraining(cfg).train()
    out = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}

    log = {"randperm": [], "randint": [], "choice": [], "bert": []}
    record(torch, "randperm", log["randperm"])
    record(torch, "randint", log["randint"])
    record(random, "choice", log["choice"])
    record(model.bert, "forward", log["bert"])
    total, *losses = model(**spec["inputs"])
    out.update(randperm=log["randperm"], randint=log["randint"], choice=log["choice"])
    out["hard_text"], out["hard_image"] = log["bert"][0][2]
    out["losses"] = {"total": total.detach(), **{n: l.detach() for n, l in zip(LOSSES, losses)}}
    params = dict(model.named_parameters())
    out["grads"] = {}
    for name, loss in zip(LOSSES, losses):
        grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
        out["grads"][name] = {k: g for k, g in zip(params, grads) if g is not None}

    if spec.get("export_dir"):
        loaded, info = BiBertImgForPreTraining.from_pretrained(spec["export_dir"], output_loading_info=True)
        out["export_missing"], out["export_unexpected"] = info["missing_keys"], info["unexpected_keys"]
        out["export_outputs"] = outputs_of(loaded, spec["inputs"])
    torch.save(out, dst)


if __name__ == "__main__":
    main(*sys.argv[1:4])
