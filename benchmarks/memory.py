"""Model-state memory per rank against world size for ZeRO 1, 2, 3 (and optimizer offload), vs ZeRO theory.

    python benchmarks/memory.py --sweep --procs 1 2 4 --out DIR        # every (ZeRO, offload, ranks) combination
    deepspeed --num_gpus 2 benchmarks/memory.py --zero 2 --out DIR       # one combination (what --sweep launches)

Each rank builds the real pre-training module and DeepSpeed engine (``assembly.build``,
``trainer.build_engine``; fp32, MVPTR stage 2) for a model large enough that model states dominate
(``--model``, default hidden 512, 8 heads, 2+2+2 layers: 21.7M parameters with the synthetic vocabulary),
trains two micro batches, and counts the bytes of unique tensor storages it holds:

* parameters: the module's parameters (ZeRO-3: the rank's partition ``ds_tensor``);
* gradients: after ``engine.backward`` of the second step, before ``engine.step``: ``param.grad`` plus every
  tensor the ZeRO optimizer keeps under an attribute whose name mentions "grad" (partitioned gradients,
  reduction buckets, contiguous gradient buffers);
* optimizer state: the Adam moments in the wrapped optimizer's ``state``;
* fp32 master copy: the ZeRO optimizer's fp32 partitions (DeepSpeed makes one even in fp32 training);
* peak RSS of the rank process (everything: activations, buffers, the Python runtime, the data).

Theory (Rajbhandari et al., "ZeRO", SC 2020, for fp32 training, Psi parameters, N ranks, Adam): parameters
4 Psi (ZeRO-3: 4 Psi / N); gradients 4 Psi (ZeRO >= 2: 4 Psi / N); Adam moments 8 Psi / N (ZeRO >= 1); fp32
master 4 Psi / N. Reduction buckets are set to ``--bucket`` elements (default 2M) so that they do not hide
the partitioned gradients of a model this size; they are real memory and are counted as gradients.
With offload the optimizer state and master copy live in host memory (the same memory on a CPU machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

DEFAULT_MODEL = dict(hidden_size=512, num_attention_heads=8, intermediate_size=2048, text_layers=2,
                     visual_layers=2, cross_layers=2, max_position_embeddings=128)
COMBOS = ((1, False), (2, False), (3, False), (2, True), (3, True))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--offload", action="store_true", help="offload the optimizer (state + master) to the CPU")
    p.add_argument("--model", default=None, help="preset or JSON of ModelConfig fields (default: see module doc)")
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--bucket", type=int, default=2_000_000, help="reduce/all-gather bucket size in elements")
    p.add_argument("--out", default="runs/bench_memory")
    p.add_argument("--sweep", action="store_true", help="launch every combination through the deepspeed launcher")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--timeout", type=int, default=900, help="seconds per launched combination")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def storages_bytes(tensors: Iterable[torch.Tensor], seen: Optional[set] = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one flat buffer count once)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device.type)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _tensors_in(value, depth: int = 0):
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth + 1)


def attribute_tensors(obj, words: Iterable[str], exclude: Iterable[str] = ()):
    """Tensors under ``obj``'s attributes whose names contain one of ``words`` (and none of ``exclude``)."""
    for name, value in vars(obj).items():
        low = name.lower()
        if any(w in low for w in words) and not any(x in low for x in exclude):
            yield from _tensors_in(value)


def local_params(module: torch.nn.Module):
    for p in module.parameters():
        yield getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p.data


def gradient_bytes(engine) -> int:
    opt = engine.optimizer
    tensors = [p.grad for p in engine.module.parameters() if p.grad is not None]
    tensors += list(attribute_tensors(opt, ("grad", "ipg")))
    return storages_bytes(tensors)


def optimizer_bytes(engine):
    """(Adam state bytes, fp32 master bytes) of the engine's optimizer."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = storages_bytes(t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)
                           and t.dim() > 0)
    master = storages_bytes(attribute_tensors(opt, ("fp32",), exclude=("grad",))) if inner is not opt else 0
    return state, master


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def theory(params: int, world: int, stage: int) -> Dict[str, float]:
    return {"param_bytes": 4 * params / (world if stage >= 3 else 1),
            "grad_bytes": 4 * params / (world if stage >= 2 else 1),
            "optimizer_state_bytes": 8 * params / (world if stage >= 1 else 1),
            "master_bytes": 4 * params / world if stage >= 1 else 0.0}


def template(args) -> str:
    zero = {"stage": args.zero}
    if args.zero >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=args.bucket,
                    allgather_bucket_size=args.bucket)
    if args.zero == 3:
        zero.update(stage3_prefetch_bucket_size=args.bucket, stage3_param_persistence_threshold=0)
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"ds_zero{args.zero}{'_offload' if args.offload else ''}_{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"zero_optimization": zero, "steps_per_print": 10 ** 9}, f)
    return path


def measure(args) -> Optional[Dict]:
    """One combination on this rank; rank 0 returns (and writes) the gathered result."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from flop_count import param_count
    from machine import environment

    from mvptr_ds import assembly
    from mvptr_ds.config import DataConfig, ModelConfig, RunConfig, TrainConfig, model_config_from
    from mvptr_ds.training import distributed
    from mvptr_ds.training.ds_config import build_ds_config, zero_stage
    from mvptr_ds.training.trainer import build_engine

    info = distributed.setup()
    model = model_config_from(args.model) if args.model else ModelConfig(**DEFAULT_MODEL)
    path = template(args) if info.is_main else None
    holder = [path]
    dist.broadcast_object_list(holder, src=0)
    train = TrainConfig(stage=2, ds_config=holder[0], max_steps=2, warmup_steps=1, micro_batch=args.micro_batch,
                        precision="fp32", wandb="disabled")
    cfg = RunConfig(model=dataclasses.replace(model, hidden_dropout=0.0, attention_dropout=0.0),
                    data=DataConfig(source="synthetic:images=64,held_out=0"), train=train).validate()
    torch.manual_seed(0)
    parts = assembly.build(cfg, info)
    ds_cfg = build_ds_config(holder[0], parts.config.train, info.world_size)
    stage = zero_stage(ds_cfg)  # one fp32 process runs stage 0 whatever the template asks (ds_config.ONE_PROCESS_NOTE)
    engine, _ = build_engine(parts.module, parts.config.train, ds_cfg, info.device)
    batches = iter(parts.loader)
    grads = 0
    for step in range(2):
        out = engine(next(batches).to(info.device))
        engine.backward(out.loss)
        if step == 1:
            grads = gradient_bytes(engine)
        engine.step()
    state, master = optimizer_bytes(engine)
    mine = {"rank": info.rank, "param_bytes": storages_bytes(local_params(engine.module)), "grad_bytes": grads,
            "optimizer_state_bytes": state, "master_bytes": master, "rss_peak_bytes": peak_rss()}
    every: List[Dict] = [None] * info.world_size
    dist.all_gather_object(every, mine)
    result = None
    if info.is_main:
        params = param_count(engine.module)
        result = {"kind": "memory", "zero_stage": stage, "asked_zero_stage": args.zero, "offload": args.offload, "world_size": info.world_size,
                  "parameters": params, "micro_batch": args.micro_batch, "bucket_elements": args.bucket,
                  "model": dataclasses.asdict(model), "per_rank": every,
                  "theory": theory(params, info.world_size, stage),
                  "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) + f"  (x{info.world_size} ranks)",
                  **environment(info.device)}
        name = f"memory_z{args.zero}{'_offload' if args.offload else ''}_w{info.world_size}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        os.remove(holder[0])
        print(f"wrote {os.path.join(args.out, name)}", flush=True)
    distributed.barrier()
    return result


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep(args) -> List[str]:
    """Launch every (ZeRO, offload) x ``--procs`` combination through the deepspeed launcher, one at a time."""
    failures = []
    for stage, offload in COMBOS:
        for procs in args.procs:
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs), "--master_port",
                   str(free_port()), str(HERE / "memory.py"), "--zero", str(stage), "--out", args.out,
                   "--micro_batch", str(args.micro_batch), "--bucket", str(args.bucket)]
            cmd += ["--offload"] if offload else []
            cmd += ["--model", args.model] if args.model else []
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            label = f"ZeRO-{stage}{' offload' if offload else ''} x{procs}"
            print(f"{label}: exit {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
            if proc.returncode != 0:
                failures.append(label)
                print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.sweep:
        failures = sweep(args)
        if failures:
            print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1 if failures else 0
    measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
