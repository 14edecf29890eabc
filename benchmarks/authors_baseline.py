"""``throughput.py --baseline eager``: an in-process *re-creation* of the authors' computation in this project's
code. It is not the authors' code (that is ``--baseline authors``: their release run by ``authors_driver.py``).

The same model and data, computed the way the authors' released code does. What differs from mvptr_ds's own
path (MVPTR.md section 3, "known defects of the released code"):

* fixed-length padding: every batch padded to ``max_seq_length + max_phrases`` text positions (35 + 5 = 40),
  ``max_tag_length`` tag positions (20) and ``max_img_seq_length`` regions (50), whatever the real lengths;
* ``ModelConfig.kernels="eager"``: attention as explicit ``softmax(QK^T/sqrt(d) - 10000 * (1 - mask)) V``;
  ``ModelConfig.skip_padding=False``: every padded position through every layer, the cross-modal input not
  packed (``model/layers.py``);
* WPG as a Python loop over the pairs of the batch, with host synchronisations per pair (boolean indexing,
  ``.item()``), instead of the batched computation of ``objectives/wpg.py``;
* fp16 with loss scaling where the device supports it (CUDA); fp32 on the CPU.

What it cannot re-create: the authors' optimizer and engine (it runs on ours: DeepSpeed, the release's
AdamW groups), their module structure and their other per-step host work; so its ratio to ours measures the
computational differences above, not the speed-up over their code.

The weights, the data order, the corruption and every loss value are the same as mvptr_ds's (checked in
``tests/benchmarks/test_throughput.py``), so the ratio of the two measured speeds is the speed-up of those differences.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from mvptr_ds.config import RunConfig
from mvptr_ds.data.types import Batch
from mvptr_ds.objectives.base import LossOutput, zero_loss
from mvptr_ds.objectives.pretraining import PretrainingModule


def authors_config(cfg: RunConfig, device: torch.device) -> RunConfig:
    """``cfg`` with the re-creation's kernels and the authors' precision (fp16 on CUDA, fp32 elsewhere)."""
    precision = "fp16" if device.type == "cuda" else "fp32"
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kernels="eager", skip_padding=False),
                               train=dataclasses.replace(cfg.train, precision=precision))


def fixed_lengths(cfg: RunConfig):
    """(text, tag, region) positions the authors pad every batch to."""
    d = cfg.data
    return d.max_seq_length + d.max_phrases, d.max_tag_length, d.max_img_seq_length


def pad_fixed(batch: Batch, text_len: int, tag_len: int, region_len: int) -> Batch:
    """``batch`` padded (with pad id 0, False, -1 labels, zero features) to fixed stream lengths."""
    def pad(t: torch.Tensor, length: int, value) -> torch.Tensor:
        extra = length - t.shape[1]
        if extra < 0:
            raise ValueError(f"batch has {t.shape[1]} positions, more than the fixed length {length}")
        return F.pad(t, [0, 0] * (t.dim() - 2) + [0, extra], value=value) if extra else t

    return dataclasses.replace(
        batch,
        text_ids=pad(batch.text_ids, text_len, 0), text_mask=pad(batch.text_mask, text_len, False),
        phrase_mask=pad(batch.phrase_mask, text_len, False), mlm_labels=pad(batch.mlm_labels, text_len, -1),
        wpg_pick_positive=pad(batch.wpg_pick_positive, text_len, 0.0),
        wpg_pick_negative=pad(batch.wpg_pick_negative, text_len, 0.0),
        phrase_regions=None if batch.phrase_regions is None else pad(batch.phrase_regions, text_len, -1),
        tag_ids=pad(batch.tag_ids, tag_len, 0), tag_mask=pad(batch.tag_mask, tag_len, False),
        mcr_labels=pad(batch.mcr_labels, tag_len, -1),
        region_feats=pad(batch.region_feats, region_len, 0.0), region_mask=pad(batch.region_mask, region_len, False))


def _pair_score(phrases: torch.Tensor, regions: torch.Tensor, pick: torch.Tensor, topk: int) -> torch.Tensor:
    """Mean over phrases ``[P, H]`` of the picked top-k cosine to regions ``[R, H]`` (one pair)."""
    cos = F.normalize(phrases.float(), dim=-1) @ F.normalize(regions.float(), dim=-1).t()  # (P, R)
    k = min(topk, regions.shape[0])
    top = cos.topk(k, dim=-1).values  # (P, k)
    choice = (pick.float() * k).long().clamp(max=k - 1)  # (P,)
    return top.gather(1, choice[:, None]).squeeze(1).mean()


def wpg_loss_per_sample(outputs, batch: Batch, margin: float = 0.2, topk: int = 3,
                        negative_cross=None, exclude_same_image: bool = True) -> LossOutput:
    """WPG as the authors compute it: a Python loop over pairs, several host syncs each. Same value as
    ``objectives.wpg.wpg_loss`` (same pairs scored, same picks; ``negative_cross`` as there)."""
    lt = batch.text_mask.shape[1]
    cross = outputs.cross
    phrase_mask, region_mask = batch.phrase_mask.bool(), batch.region_mask.bool()
    hinges, pos, neg = [], [], []
    for i in range(batch.size):
        j = int(batch.wpg_negative_pair[i].item())
        if j < 0 or (exclude_same_image and int(batch.image_ids[j].item()) == int(batch.image_ids[i].item())):
            continue
        if not bool(phrase_mask[i].any().item()) or not bool(region_mask[i].any().item()) \
                or not bool(region_mask[j].any().item()):
            continue
        phrases = cross[i, :lt][phrase_mask[i]]  # (P, H)
        pick, pick_neg = batch.wpg_pick_positive[i][phrase_mask[i]], batch.wpg_pick_negative[i][phrase_mask[i]]
        s_pos = _pair_score(phrases, cross[i, lt:][region_mask[i]], pick, topk)
        if negative_cross is None:
            s_neg = _pair_score(phrases, cross[j, lt:][region_mask[j]], pick_neg, topk)
        else:
            s_neg = _pair_score(negative_cross[i, :lt][phrase_mask[i]], negative_cross[i, lt:][region_mask[j]],
                                pick_neg, topk)
        hinges.append((margin + s_neg - s_pos).clamp(min=0))
        pos.append(s_pos.detach())
        neg.append(s_neg.detach())
    count = len(hinges)
    tie = zero_loss(cross, negative_cross)
    if not count:
        zero = tie.new_zeros(())
        return LossOutput("wpg", tie, {"pos": zero, "neg": zero, "pairs": zero})
    loss = torch.stack(hinges).sum() / count + tie
    return LossOutput("wpg", loss, {"pos": torch.stack(pos).mean(), "neg": torch.stack(neg).mean(),
                                    "pairs": torch.tensor(float(count), device=loss.device)})


class AuthorsStyleModule(PretrainingModule):
    """``PretrainingModule`` whose WPG is the per-pair loop (the eager re-creation's); build it around an existing
    module's parts."""

    @classmethod
    def wrap(cls, module: PretrainingModule) -> "AuthorsStyleModule":
        out = cls(module.backbone, module.objectives, module.objective_cfg, gather=module.gather)
        out.heads = module.heads  # the same head modules (and weights), not fresh ones
        return out

    def compute(self, name: str, outputs, batch: Batch) -> LossOutput:
        if name == "wpg" and self.objective_cfg.wpg_negative_encoding == "shared":
            raise ValueError("the authors' per-pair WPG loop scores the hinge (separate or joint), not "
                             "--wpg_negative_encoding shared, which the release does not have")
        if name == "wpg":
            return wpg_loss_per_sample(outputs, batch, margin=self.objective_cfg.wpg_margin,
                                       topk=self.objective_cfg.wpg_topk,
                                       negative_cross=self.wpg_negative_cross(outputs, batch),
                                       exclude_same_image=self.objective_cfg.exclude_same_image)
        return super().compute(name, outputs, batch)


# Names that say what these are.
EagerRecreationModule = AuthorsStyleModule
recreation_config = authors_config
