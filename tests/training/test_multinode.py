"""A multi-node launch for real, on one machine: two "nodes" (127.0.0.1 and 127.0.0.2) behind a private sshd,
started through DeepSpeed's hostfile + pdsh path as the README's multi-node section says; stopped with SIGTERM
to rank 0 (the pid ``<output_dir>/.lock`` names, sent over ssh) instead of DeepSpeed's ``pkill -f``; resumed; its
losses are those of ``deepspeed --num_gpus 2``. The harness (``two_nodes.py``) skips where sshd or pdsh cannot
be had, and stops everything it started by pid.
"""
import json
import time

import pytest

from conftest import prebuild_deepspeed_ops, run_cli
from two_nodes import ADDRESSES, start

pytestmark = pytest.mark.slow

DATA = "synthetic:seed=3,images=16,held_out=2,captions_per_image=1"
LONG = ("--max_steps", "10000", "--save_every", "10000")      # stopped by a signal long before


def args(out, *extra):
    return ["--model", "tiny", "--data", DATA, "--output_dir", str(out), "--micro_batch", "4", "--log_every", "1",
            "--warmup_steps", "0", "--seed", "5", "--wandb", "disabled"] + [str(e) for e in extra]


def metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def wait_for(predicate, what, timeout):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    n = start(tmp_path_factory.mktemp("nodes"))
    try:
        yield n
    finally:
        n.stop()


def test_hostfile_pdsh_launch_stops_resumes_and_matches_num_gpus(nodes, tmp_path):
    prebuild_deepspeed_ops()
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    first = nodes.launch(args(out, *LONG), log)
    wait_for(lambda: len(metrics(out)) >= 2 or first.poll() is not None, "two steps", timeout=400)
    assert first.poll() is None, log.read_text()[-4000:]
    pid, _host = (out / ".lock").read_text().split()           # rank 0, on the hostfile's first node
    assert nodes.ssh(ADDRESSES[0], f"kill -TERM {pid}").returncode == 0
    assert first.wait(120) == 0, log.read_text()[-4000:]
    text = log.read_text()
    for node, address in enumerate(ADDRESSES):                 # pdsh prefixes each node's lines with its host
        assert f"{address}: " in text and f"nnodes=2, num_local_procs=1, node_rank={node}" in text, text[-4000:]
    assert f"{ADDRESSES[0]}: received SIGTERM: stopped after step" in text, text[-4000:]
    assert "Traceback" not in text and nodes.marked() == [], text[-4000:]   # every rank and launcher exited
    done = sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*") if (p / "COMPLETE").exists())
    assert len(done) == 1 and done[0] >= 2, (done, text[-3000:])
    step = done[0]
    assert json.loads((out / "checkpoints" / f"step{step}" / "COMPLETE").read_text())["world_size"] == 2

    # the same --max_steps throughout (the learning-rate schedule depends on it), stopped one step later
    second = nodes.launch(args(out, *LONG, "--stop_after", step + 1), tmp_path / "second.log")
    assert second.wait(400) == 0, (tmp_path / "second.log").read_text()[-4000:]
    reference = tmp_path / "reference"
    run_cli(args(reference, *LONG, "--stop_after", step + 1), launcher_procs=2, timeout=420)
    got, want = metrics(out), metrics(reference)
    assert sorted(got) == sorted(want) == list(range(1, step + 2))
    for s in want:
        assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])
