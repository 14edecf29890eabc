"""Analytic FLOP count of one MVPTR pre-training step: the work required, and the work a given path executes.

Convention (as in Megatron-LM / PaLM MFU figures): only matrix products are counted, 2 FLOPs per
multiply-add; embedding gathers, LayerNorm, GELU, softmax, dropout, residual adds and the optimizer are not.
Backward costs 2x forward for every product whose two operands both need a gradient, 1x where one operand
does not (the region projection: region features need no gradient, so only the weight gradient is
computed), 0x for products under ``no_grad`` (ITM negative mining). Recomputation by activation checkpointing
is not counted (model FLOPs, not hardware FLOPs).

Notation: H hidden, I intermediate, F region feature width, V word-piece vocabulary (``only_word_size``).
One encoder layer over a sequence of n real positions costs, forward,

    linear  2 n (4 H^2 + 2 H I)        Q, K, V, attention output (4 H^2), feed-forward (2 H I)
    attn    4 n^2 H                    Q K^T and P V (2 n^2 H each), summed over heads

**Required** counts each sequence at its real length n (no padding anywhere). For a micro batch of B pairs:

    text encoder      per pair, n = caption tokens (+ concepts, [CLS], [SEP])
    visual encoder    per pair, n = tag tokens + regions
    cross encoder     per pair, n = text tokens + regions, for the B positives, the B ITM negatives and the
                      B WPG negatives (``wpg_negative_encoding="joint"``); the negatives' lengths depend on the
                      choice, so every encoder call's lengths are read from the calls. ITM's negatives need
                      only the pooler's position 0: their last layer costs 2 n (2 H^2) for keys and values,
                      2 (2 H^2 + 2 H I) for the one row's query, output and feed-forward, and 4 n H attention
    region projection 2 R F H          R = real regions
    MCR / MLM heads   2 N (H^2 + H V)  N = scored (corrupted) positions; dense transform + decoder
    pooler + ITM      2 (2B) (H^2 + 2H)
    projections       2 (2B) H^2       txt_proj, vis_proj
    VSC               2 (2 B^2 H)      text->image and image->text similarities
    ITM mining        2 (2 B^2 H)      forward only (no_grad)
    WPG               2 P_i (R_i + R_j) H per pair with P_i phrases (positive and negative image j)

**Executed** counts the shapes a path really multiplies, which is what DeepSpeed's flops profiler sees
(forward only): unpadded encoders run the linear layers on the N real rows but attention on the padded
``[B, L]`` block (4 B L^2 H), the packed cross encoder on ``L = max_i n_i``; the authors-style path
(``skip_padding=False``) runs every layer on all B L rows; the region projection always runs on all ``B Lr``
padded rows and the WPG cosines on the padded ``[B, Lt, Lr]`` blocks. ``tests/benchmarks/test_throughput.py`` checks the
executed forward count against the profiler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

from mvptr_ds.config import ModelConfig


@dataclass
class StepFlops:
    """FLOPs of one micro batch. ``forward``/``train`` are the required work; ``executed_forward`` what ran."""

    forward: float = 0.0
    train: float = 0.0                 # forward + backward, required
    executed_forward: float = 0.0
    parts: Dict[str, float] = field(default_factory=dict)  # required forward FLOPs by part

    def add(self, part: str, fwd: float, executed: float, backward_factor: float = 2.0) -> None:
        self.forward += fwd
        self.train += fwd * (1.0 + backward_factor)
        self.executed_forward += executed
        self.parts[part] = self.parts.get(part, 0.0) + fwd


@dataclass
class _EncoderCall:
    name: str
    layers: int
    lengths: torch.Tensor  # [B] real positions per row
    padded_len: int      # L of the [B, L] block the call received
    padded_rows: bool    # True when every position runs through the layers (skip_padding off)
    first_only: bool = False  # the last layer for position 0 only (pooled_cross: ITM's negatives)


class FlopCounter:
    """Counts FLOPs of the micro batches a :class:`~mvptr_ds.objectives.PretrainingModule` processes.

    ``attach(module)`` registers forward pre-hooks on the backbone's encoders (they record the real and
    padded lengths of every call, ITM negatives included); after a forward pass, ``count(batch)`` returns the
    :class:`StepFlops` of that micro batch and clears the record.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.calls: List[_EncoderCall] = []
        self._handles = []

    def attach(self, module: torch.nn.Module) -> "FlopCounter":
        backbone = module.backbone
        for name in ("text_encoder", "visual_encoder", "cross_encoder"):
            enc = getattr(backbone, name, None)
            if enc is not None:
                self._handles.append(enc.register_forward_pre_hook(self._hook(name, enc)))
        self.objectives = tuple(module.objectives)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str, encoder):
        def record(_module, args):
            h, mask = args[0], args[1]
            lengths = mask.detach().bool().sum(dim=1)  # (B,) on the device; read in count(), not here (no sync)
            first_only = bool(args[3]) if len(args) > 3 else False
            self.calls.append(_EncoderCall(name, len(encoder.layer), lengths, int(h.shape[1]),
                                           bool(getattr(encoder, "padded", False)), first_only))
        return record

    def layer_flops(self, lengths: List[int], padded_len: int, padded_rows: bool, layers: int):
        """(required, executed) forward FLOPs of ``layers`` encoder layers over rows of ``lengths``."""
        h, i = self.cfg.hidden_size, self.cfg.intermediate_size
        per_token = 2 * (4 * h * h + 2 * h * i)
        required = sum(per_token * n + 4 * n * n * h for n in lengths)
        rows = len(lengths) * padded_len if padded_rows else sum(lengths)
        executed = per_token * rows + 4 * len(lengths) * padded_len ** 2 * h
        return layers * required, layers * executed

    def first_only_layer_flops(self, lengths: List[int], padded_len: int):
        """(required, executed) forward FLOPs of a packed last layer computed for position 0 only
        (``pooled_cross``): keys and values of every real row, then the query, attention output, feed-forward and
        one query's attention per sequence."""
        h, i = self.cfg.hidden_size, self.cfg.intermediate_size
        rows = sum(lengths)
        one_row = 2 * (2 * h * h + 2 * h * i)  # query, attention output, feed-forward
        required = sum(2 * 2 * h * h * n + one_row + 4 * n * h for n in lengths)
        executed = 2 * 2 * h * h * rows + len(lengths) * (one_row + 4 * padded_len * h)
        return required, executed

    def count(self, batch) -> StepFlops:
        """FLOPs of the micro batch ``batch`` whose forward pass just ran; clears the recorded calls."""
        cfg = self.cfg
        h, v, f = cfg.hidden_size, cfg.only_word_size, cfg.img_feature_dim
        out = StepFlops()
        for call in self.calls:
            lengths = [int(n) for n in call.lengths.tolist()]
            req, exe = self.layer_flops(lengths, call.padded_len, call.padded_rows, call.layers)
            if call.first_only:  # the last layer is required at position 0 only; the padded path runs it all
                full_req, full_exe = self.layer_flops(lengths, call.padded_len, call.padded_rows, 1)
                last_req, last_exe = self.first_only_layer_flops(lengths, call.padded_len)
                req -= full_req - last_req
                exe -= 0 if call.padded_rows else full_exe - last_exe
            out.add(call.name, req, exe)
        self.calls = []
        b = batch.size
        region_mask = batch.region_mask.bool()
        regions = int(region_mask.sum())
        out.add("region_projection", 2 * regions * f * h, 2 * b * region_mask.shape[1] * f * h, backward_factor=1.0)
        head = 2 * (h * h + h * v)
        if "mcr" in self.objectives:
            n = int((batch.mcr_labels >= 0).sum())
            out.add("mcr_head", head * n, head * n)
        if "mlm" in self.objectives:
            n = int(((batch.mlm_labels >= 0) & ~batch.phrase_mask.bool()).sum())
            out.add("mlm_head", head * n, head * n)
        out.add("projections", 2 * 2 * b * h * h, 2 * 2 * b * h * h)
        if "vsc" in self.objectives:
            out.add("vsc", 2 * 2 * b * b * h, 2 * 2 * b * b * h)
        if "itm" in self.objectives:
            out.add("itm_mining", 2 * 2 * b * b * h, 2 * 2 * b * b * h, backward_factor=0.0)
            out.add("pooler_itm", 2 * 2 * b * (h * h + 2 * h), 2 * 2 * b * (h * h + 2 * h))
        elif {"mlm", "wpg"} & set(self.objectives):
            out.add("pooler_itm", 2 * b * h * h, 2 * b * h * h)
        if "wpg" in self.objectives:
            phrases = batch.phrase_mask.bool().sum(dim=1)  # (B,)
            reg = region_mask.sum(dim=1)  # (B,)
            neg = batch.wpg_negative_pair.clamp(min=0)
            req = int((2 * phrases * (reg + reg[neg]) * h).sum())
            lt, lr = batch.phrase_mask.shape[1], region_mask.shape[1]
            out.add("wpg", req, 2 * 2 * b * lt * lr * h)
        return out


def param_count(module: torch.nn.Module) -> int:
    """Parameters of ``module`` (the full count also under ZeRO-3, where a parameter's ``ds_numel`` holds it)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
