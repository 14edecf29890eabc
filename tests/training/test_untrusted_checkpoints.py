"""No code from a checkpoint ever runs, and no modified checkpoint is used: every reading path.

A DeepSpeed ``step<N>`` folder is tampered with (a pickled ``os.system`` call in the model states or in an
optimizer shard, a flipped byte inside the tensor data, a manifest of the wrong shape or naming a file
outside the folder, a file the manifest does not list); each command that can read it (``--resume``,
``--init_from`` a step folder, ``evaluate --checkpoint`` a run without ``final/``, ``embed --checkpoint``
a step folder) prints one ``error:`` line naming the file, exits 2 and runs nothing.
"""
import json
import os
import shutil

import pytest
import torch

from test_fault_harness import launch, one_error, small_run_args, stopped_after_two

pytestmark = [pytest.mark.fault, pytest.mark.slow]

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
train_args = small_run_args


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after step 2: one complete checkpoint, no ``final/`` (copied by each test). One process
    runs ZeRO stage 0: model and optimizer state in one file."""
    out = stopped_after_two(tmp_path_factory.mktemp("untrusted") / "run")
    assert not (out / "final").exists()
    return out


@pytest.fixture(scope="module")
def stopped_zero3_run(tmp_path_factory):
    """The same with ZeRO-3 (kept at one process): the optimizer state in its own shard file."""
    out = tmp_path_factory.mktemp("untrusted3") / "run"
    launch(train_args(out, "--stop_after", "2", "--ds_config", "ds_configs/zero3.json"), log_dir=str(out.parent)).ok()
    assert (out / "checkpoints" / "step2" / OPTIM).exists()
    return out


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def tampered(src, tmp_path, file_name, update_manifest):
    """A copy of ``src`` whose ``file_name`` holds a pickled command that creates ``tmp_path/pwned``."""
    run = tmp_path / "run"
    shutil.copytree(src, run)
    step = run / "checkpoints" / "step2"
    target = step / file_name
    state = torch.load(target, weights_only=False)
    state["evil"] = _Exploit(str(tmp_path / "pwned"))
    torch.save(state, target)
    if update_manifest:  # a careful attacker also rewrites the manifest's size and hash
        from mvptr_ds.training.safe_load import manifest_entry
        meta = json.loads((step / "COMPLETE").read_text())
        meta["files"][file_name] = manifest_entry(str(target))
        (step / "COMPLETE").write_text(json.dumps(meta))
    return run, step, target


def commands(run, step, tmp_path):
    """Every command that reads a training checkpoint, pointed at the tampered one."""
    return {
        "resume": train_args(run, "--max_steps", "4"),
        "init_from": train_args(tmp_path / "fresh", "--max_steps", "1", "--init_from", str(step)),
        "evaluate": ["evaluate", "--checkpoint", str(run), "--output", str(tmp_path / "eval.json")],
        "embed": ["embed", "--checkpoint", str(step), "--output", str(tmp_path / "pairs.npz"), "--limit", "4"],
    }


@pytest.mark.parametrize("file_name", [MODEL, OPTIM])
def test_pickled_code_never_runs(request, tmp_path, file_name):
    source = request.getfixturevalue("stopped_run" if file_name == MODEL else "stopped_zero3_run")
    for update in (False, True):
        case = tmp_path / ("rehashed" if update else "plain")
        case.mkdir()
        run, step, target = tampered(source, case, file_name, update)
        for name, argv in commands(run, step, case).items():
            line = one_error(launch(argv, log_dir=str(case)), str(target))
            expected = "refusing to load" if update else "modified"
            assert expected in line, (name, line)
            assert not (case / "pwned").exists(), f"{name}: the pickled command ran"
        assert not (case / "eval.json").exists() and not (case / "pairs.npz").exists()


def test_flipped_byte_is_refused_before_use(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    target = run / "checkpoints" / "step2" / MODEL
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data: same size, still unpicklable
    target.write_bytes(bytes(data))
    for name, argv in commands(run, target.parent, tmp_path).items():
        line = one_error(launch(argv, log_dir=str(tmp_path)), str(target), "SHA-256 differs")
        assert "modified since the checkpoint was saved" in line, name


def test_manifest_shape_and_confinement(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    marker = run / "checkpoints" / "step2" / "COMPLETE"
    good = json.loads(marker.read_text())
    cases = [({**good, "files": sorted(good["files"])}, "field 'files' must map file names"),
             ({**good, "files": {**good["files"], "../../x.pt": good["files"][MODEL]}}, "leaves the checkpoint folder"),
             ({**good, "files": {k: v for k, v in good["files"].items() if k != MODEL}}, "not listed")]
    for meta, expected in cases:
        marker.write_text(json.dumps(meta))
        one_error(launch(train_args(run), log_dir=str(tmp_path)), expected)


def test_symlinked_file_is_refused(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    target = run / "checkpoints" / "step2" / MODEL
    os.replace(target, tmp_path / "elsewhere.pt")
    os.symlink(tmp_path / "elsewhere.pt", target)
    one_error(launch(train_args(run), log_dir=str(tmp_path)), str(target), "link")


def test_deepspeed_readers_are_forced_weights_only(stopped_zero3_run, tmp_path):
    """Inside ``weights_only_loads`` DeepSpeed's own ``zero_to_fp32`` (which passes ``weights_only=False``)
    refuses the pickled call too: the guard does not depend on the manifest check running first."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mvptr_ds.training.safe_load import weights_only_loads

    run, step, _ = tampered(stopped_zero3_run, tmp_path, OPTIM, update_manifest=True)
    with pytest.raises(Exception, match="(?i)weights.only|Unsupported global"):
        with weights_only_loads():
            get_fp32_state_dict_from_zero_checkpoint(str(step.parent), tag="step2")
    assert not (tmp_path / "pwned").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored on the way out
