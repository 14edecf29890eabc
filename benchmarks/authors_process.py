"""``throughput.py --baseline authors``: the authors' released code stepped in a process of its own
(``authors_driver.py``, over a pipe), what it is told to build, and its figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from timing import phase_stats

HERE = Path(__file__).resolve().parent


class BaselineUnavailable(Exception):
    """The authors' code cannot run here; the message is the one line the benchmark prints."""


def authors_spec(cfg, vocab, args, threads: int) -> Dict[str, object]:
    """What ``authors_driver.py`` builds: our sizes and vocabulary, the authors' fixed lengths, our batch."""
    from authors_baseline import fixed_lengths
    from authors_data import ids_of_vocab

    m = cfg.model
    if not m.text_layers == m.visual_layers == m.cross_layers:
        raise BaselineUnavailable(f"their model has three encoders of equal depth; ours has {m.text_layers}/"
                                  f"{m.visual_layers}/{m.cross_layers} layers")
    text_len, tag_len, region_len = fixed_lengths(cfg)
    return {"hidden": m.hidden_size, "heads": m.num_attention_heads, "layers": m.text_layers,
            "intermediate": m.intermediate_size, "max_position": m.max_position_embeddings,
            "dropout": m.hidden_dropout, "vocab_size": m.vocab_size, "only_word_size": m.only_word_size,
            "ids": ids_of_vocab(vocab).to_dict(), "text_len": text_len, "tag_len": tag_len,
            "region_len": region_len, "micro_batch": cfg.train.micro_batch, "seed": cfg.train.seed,
            "data_seed": cfg.train.seed, "threads": threads, "device": args.device,
            "precision": cfg.train.precision, "mask_prob": cfg.data.mask_prob,
            "img_layernorm": int(m.use_img_layernorm)}


class AuthorsProcess:
    """``authors_driver.py`` in a subprocess, stepped over a pipe (protocol in its docstring)."""

    kind = "authors"

    def __init__(self, repo: str, spec: Dict[str, object], timeout_s: float = 3600.0):
        if not os.path.isdir(os.path.join(repo, "oscar")):
            raise BaselineUnavailable(f"the authors' code is not at {repo} (--authors_repo; it ships in "
                                      f"../shared/peer, not with a clone)")
        self.repo, self.spec = repo, spec
        env = dict(os.environ)  # their repository goes first on the driver's sys.path, before any transformers
        env["OMP_NUM_THREADS"] = str(spec["threads"])
        self.proc = subprocess.Popen([sys.executable, str(HERE / "authors_driver.py"), "--authors_repo", repo,
                                      "--spec", json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(HERE))
        hello = self._read()
        if "error" in hello:
            self.close()
            raise BaselineUnavailable(hello["error"])
        self.hello = hello
        self.parameters = int(hello["parameters"])

    def _read(self) -> Dict[str, object]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"authors_driver.py exited ({code}) without answering; its stderr is above")
        return json.loads(line)

    def call(self, msg: Dict[str, object]) -> Dict[str, object]:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"authors_driver.py: {reply['error']}")
        return reply

    def prepare(self):
        return None

    def step(self, sample_ids: Optional[List[int]]) -> Dict[str, float]:
        if sample_ids is None:
            raise ValueError("the authors' driver steps on sample indices drawn by our loader")
        return self.call({"cmd": "step", "ids": [int(i) for i in sample_ids]})

    def reset_peak(self) -> None:
        self.call({"cmd": "reset_peak"})

    def stats(self) -> Dict[str, object]:
        return self.call({"cmd": "stats"})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def summarize_authors(proc: AuthorsProcess, records: List[Dict[str, float]]) -> Dict[str, object]:
    stats = proc.stats()
    total = sum(r["step"] for r in records)
    samples = sum(r["samples"] for r in records)
    return {"parameters": proc.parameters, "precision": proc.hello["precision"],
            "threads": proc.hello["threads"], "vocab_size": proc.hello["vocab_size"],
            "only_word_size": proc.hello["only_word_size"], "fixed_lengths": proc.hello["fixed_lengths"],
            "repo": proc.repo, "steps": len(records), "micro_batch": proc.spec["micro_batch"],
            "samples_per_s": samples / total, "step_time_s": total / len(records),
            "breakdown_s": {k: sum(r[k] for r in records) / len(records) for k in ("forward", "backward",
                                                                                   "optimizer")},
            "phases_s": phase_stats(records), "loss_last": records[-1]["loss"],
            "peak_memory_bytes": stats["peak_memory_bytes"], "peak_memory_kind": stats["peak_memory_kind"]}
