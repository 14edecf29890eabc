"""Fine-tuning modules: the MVPTR backbone, one task head and the task's loss (MVPTR.md section 4).

:class:`FinetuneModule` is the ``nn.Module`` handed to DeepSpeed by the same training loop as pre-training
(``training.trainer.train`` with :class:`mvptr_ds.finetune.runner.TaskBuilder`). Its state dict is ``backbone.*``
(the names of pre-training, so ``--init_from`` a pre-training run loads the backbone) plus ``heads.<task>.*``:
new heads as the release builds them (``finetune.heads``); VQA's transform starts from the pre-trained MLM
head's (``init_aliases``), retrieval's classifier is new (``evaluate`` re-ranks with it).

Losses (``forward``), and what ``predict`` returns for evaluation:

* ``retrieval``: VSC + ITM of pre-training on the task's image-caption pairs, ITM scored by the new head
  (predictions: see ``evaluation.retrieval``);
* ``vqa``: binary cross-entropy of the answer logits (text ``[CLS]`` of the cross-modal encoder) against
  the soft scores, summed over answers, mean over questions; predicts the top answer;
* ``snli_ve``: cross-entropy of 3 logits from the pooled output; predicts the top label;
* ``refcoco``: MSE between the cosine of ``[CLS]`` and each region (cross-modal layer ``ref_layer``) and that
  region's IoU with the target box, over real regions; predicts the highest-scoring region.

Every parameter is used in the forward pass and tied into the loss (an exact zero for parts a task does not
read: the contrastive projections; for refcoco the cross-modal layers above ``ref_layer`` and the pooler),
so ZeRO (stage 3 included) sees the same gradients on every step, as in pre-training.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mvptr_ds.config import ConfigError, ModelConfig, ObjectiveConfig
from mvptr_ds.finetune.batching import TaskBatch
from mvptr_ds.finetune.heads import EntailmentHead, RetrievalHead, VQAHead, region_scores
from mvptr_ds.model.mvptr import MVPTRModel
from mvptr_ds.objectives.base import ModuleOutput, zero_loss
from mvptr_ds.objectives.itm import itm_loss
from mvptr_ds.objectives.vsc import vsc_loss

TASK_NAMES = ("retrieval", "vqa", "snli_ve", "refcoco")


class FinetuneModule(nn.Module):
    """The backbone, the task's head and its loss; ``head_dropout`` None: the model's hidden dropout (the
    release)."""

    def __init__(self, model_cfg: ModelConfig, task: str, num_answers: int = 0, head_dropout: Optional[float] = None,
                 ref_layer: int = 3, objective_cfg: ObjectiveConfig = ObjectiveConfig()):
        super().__init__()
        self.objective_cfg = objective_cfg  # retrieval's VSC and ITM options
        if task not in TASK_NAMES:
            raise ConfigError(f"--task {task!r}: expected one of {', '.join(TASK_NAMES)}")
        self.task = task
        self.backbone = MVPTRModel(model_cfg, with_cross=True)
        self.ref_layer = min(ref_layer, model_cfg.cross_layers)
        dropout = model_cfg.hidden_dropout if head_dropout is None else head_dropout
        if task == "retrieval":
            head = RetrievalHead(model_cfg, dropout)
        elif task == "vqa":
            if num_answers < 1:
                raise ConfigError("vqa: the answer vocabulary is empty")
            head = VQAHead(model_cfg, num_answers, dropout)
        elif task == "snli_ve":
            head = EntailmentHead(model_cfg, dropout)
        else:
            head = None
        self.heads = nn.ModuleDict({task: head} if head is not None else {})

    def init_aliases(self) -> Dict[str, str]:
        """Parameters that ``--init_from`` fills from a differently named tensor of a pre-training checkpoint
        (ours -> theirs): VQA's transform from the MLM head's, whose names the release's VQA head shares."""
        if self.task != "vqa":
            return {}
        return {k: "heads.mlm." + k[len("heads.vqa."):] for k in self.state_dict()
                if k.startswith("heads.vqa.transform.")}

    def logits(self, tb: TaskBatch):
        """(task scores, backbone outputs): answers ``[B, A]``, labels ``[B, 3]``, regions ``[B, Lr]``."""
        b = tb.batch
        if self.task == "refcoco":
            out = self.backbone(b, run_cross=False)
            regions = out.visual[:, out.num_tags:]  # (B, Lr, H)
            # Every cross-modal layer runs (ZeRO-3 gathers parameters, and reduces their gradients, only through
            # module calls); the layers above ref_layer and the pooler are tied in with an exact zero.
            picked, out.cross = self.backbone.encode_cross(out.text, b.text_mask, regions, b.region_mask,
                                                           keep_layer=self.ref_layer)
            out.pooled = self.backbone.pool(out.cross)
            return region_scores(picked, b.text_ids.shape[1]), out
        out = self.backbone(b)
        if self.task == "vqa":
            return self.heads["vqa"](out.cross[:, 0]).float(), out
        if self.task == "snli_ve":
            return self.heads["snli_ve"](out.pooled).float(), out
        return None, out

    def forward(self, tb: TaskBatch) -> ModuleOutput:
        scores, out = self.logits(tb)
        b = tb.batch
        metrics: Dict[str, torch.Tensor] = {}
        if self.task == "retrieval":
            oc = self.objective_cfg
            vsc = vsc_loss(out.text_embed, out.visual_embed, b.image_ids, out.logit_scale,
                           exclude_same_image=oc.exclude_same_image, cap_scale=oc.cap_logit_scale)
            itm = itm_loss(out, b, self.backbone, self.heads["retrieval"], negatives=oc.itm_negatives,
                           exclude_same_image=oc.exclude_same_image, cap_scale=oc.cap_logit_scale,
                           prior=oc.itm_prior)
            losses = {"vsc": vsc.loss, "itm": itm.loss}
            metrics.update({f"vsc/{k}": v for k, v in vsc.metrics.items()})
            metrics.update({f"itm/{k}": v for k, v in itm.metrics.items()})
        elif self.task == "vqa":
            loss = F.binary_cross_entropy_with_logits(scores, tb.answer_scores.float(), reduction="sum")
            losses = {"vqa": loss / max(scores.shape[0], 1)}
        elif self.task == "snli_ve":
            losses = {"snli_ve": F.cross_entropy(scores, tb.labels)}
            with torch.no_grad():
                metrics["snli_ve/acc"] = (scores.argmax(1) == tb.labels).float().mean()
        else:
            real = b.region_mask.bool()
            err = (scores - tb.region_iou.float()).pow(2) * real
            losses = {"refcoco": err.sum() / real.sum().clamp(min=1)}
        total = sum(losses.values())
        unused = zero_loss(out.text, out.visual, out.text_embed, out.visual_embed, out.cross, out.pooled,
                           out.logit_scale)
        return ModuleOutput(loss=total + unused, losses=losses, metrics=metrics)

    @torch.no_grad()
    def predict(self, tb: TaskBatch) -> torch.Tensor:
        """Predicted answer / label / region index per example: ``[B]`` long."""
        scores, _ = self.logits(tb)
        if self.task == "refcoco":
            scores = scores.masked_fill(~tb.batch.region_mask.bool(), float("-inf"))
        return scores.argmax(dim=1)
