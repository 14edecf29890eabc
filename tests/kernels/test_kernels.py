"""Parity of the fused Triton kernels with the PyTorch reference, on the CPU under the Triton interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` kernel is defined, so it is set here before the kernel
modules are imported; if another test module imported them earlier without it, they are reloaded.
Every check draws fresh random inputs (the seed is in the failure message) and fills each kernel-written
buffer with NaN before the call, so an element the kernel fails to write shows up as NaN.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mvptr_ds import kernels  # noqa: E402
from mvptr_ds.kernels import flex, reference, triton_attention, triton_embedding  # noqa: E402
from mvptr_ds.kernels.flex import attention as flex_attention  # noqa: E402

from kernel_parity import (LOWP, check, embedding_inputs, masked_reference, poisoned,  # noqa: E402,F401
                           rel, run_attention, run_embedding, seed)

REPO = Path(__file__).resolve().parents[2]


def set_interpreted(flag: bool) -> None:
    """Make the kernel modules interpreted (or compiled): the mode is fixed when their kernels are defined."""
    if flag:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    for mod in (triton_attention, triton_embedding):
        if (type(mod._fwd_kernel).__name__ == "InterpretedFunction") != flag:
            importlib.reload(mod)


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    """Another test module (the GPU one) may have reloaded the kernels compiled; take them back."""
    set_interpreted(True)


# ---- concept embedding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 9), (1, 5)])
@pytest.mark.parametrize("table_grad", ["segment", "atomic"])
def test_embedding_fp32_matches_float64_reference(shape, table_grad, seed):
    ids, pos, types, tables = embedding_inputs(*shape)
    grad_out = torch.randn(*shape, tables[0].shape[1], dtype=torch.float64)
    want, want_grads = run_embedding(reference.concept_embedding, ids, pos, types, tables, torch.float64, grad_out)
    got, got_grads = run_embedding(triton_embedding.concept_embedding, ids, pos, types, tables, torch.float32,
                                   grad_out, table_grad=table_grad)
    check("output", got, want, 1e-5, seed)
    for name, g, w in zip(("word", "position", "type", "ln weight", "ln bias"), got_grads, want_grads):
        check(f"grad {name}", g, w, 1e-5, seed)
    untouched = torch.ones(tables[0].shape[0], dtype=torch.bool)
    untouched[ids.unique()] = False
    assert (got_grads[0][untouched] == 0).all(), f"rows no id touched must get zero gradient (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_embedding_low_precision(dtype, seed):
    ids, pos, types, tables = embedding_inputs(3, 9)
    tables = [t.to(dtype).double() for t in tables]  # exactly representable in dtype
    grad_out = torch.randn(3, 9, tables[0].shape[1], dtype=dtype).double()
    exact, exact_grads = run_embedding(reference.concept_embedding, ids, pos, types, tables, torch.float64, grad_out)
    ref, ref_grads = run_embedding(reference.concept_embedding, ids, pos, types, tables, dtype, grad_out)
    got, got_grads = run_embedding(triton_embedding.concept_embedding, ids, pos, types, tables, dtype, grad_out)
    assert got.dtype == dtype
    for name, g, r, w in zip(("output", "word", "position", "type", "ln weight", "ln bias"),
                             [got, *got_grads], [ref, *ref_grads], [exact, *exact_grads]):
        check(name, g, w, 2 * rel(r, w) + LOWP[dtype], seed)


def test_embedding_dropout_matches_masked_reference(seed):
    ids, pos, types, tables = embedding_inputs(2, 11)
    p = 0.3
    grad_out = torch.randn(2, 11, tables[0].shape[1], dtype=torch.float64)
    torch.manual_seed(seed)
    got, got_grads = run_embedding(triton_embedding.concept_embedding, ids, pos, types, tables, torch.float32,
                                   grad_out, dropout_p=p, training=True)
    torch.manual_seed(seed)
    kernel_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())  # the draw the forward made
    keep = triton_embedding.dropout_keep_mask(kernel_seed, ids.numel(), tables[0].shape[1], p, "cpu")
    keep = keep.view(*ids.shape, -1)
    assert 0.5 < keep.double().mean() < 0.9, f"keep fraction {keep.double().mean():.3f} for p={p} (seed {seed})"

    def masked_reference(*args):
        return reference.concept_embedding(*args) * keep / (1 - p)

    want, want_grads = run_embedding(masked_reference, ids, pos, types, tables, torch.float64, grad_out)
    check("output", got, want, 1e-5, seed)
    for name, g, w in zip(("word", "position", "type", "ln weight", "ln bias"), got_grads, want_grads):
        check(f"grad {name}", g, w, 1e-5, seed)


def test_embedding_segment_grad_is_bitwise_deterministic(seed):
    ids, pos, types, tables = embedding_inputs(2, 11)
    grad_out = torch.randn(2, 11, tables[0].shape[1], dtype=torch.float64)
    runs = [run_embedding(triton_embedding.concept_embedding, ids, pos, types, tables, torch.float32, grad_out)[1]
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b), f"segment table gradients differ between two runs (seed {seed})"


def test_embedding_long_runs_of_one_id(seed):
    """Runs of equal ids longer than the segment kernel's 16-row tile (word, position and type tables)."""
    ids, pos, types, tables = embedding_inputs(3, 19, n_pos=24)
    ids[:2] = 7                                       # a run of 38 tokens of id 7, then a padding row of 19 zeros
    types[:] = 1                                      # one run of 57 over the type table
    grad_out = torch.randn(3, 19, tables[0].shape[1], dtype=torch.float64)
    want, want_grads = run_embedding(reference.concept_embedding, ids, pos, types, tables, torch.float64, grad_out)
    got, got_grads = run_embedding(triton_embedding.concept_embedding, ids, pos, types, tables, torch.float32,
                                   grad_out)
    check("output", got, want, 1e-5, seed)
    for name, g, w in zip(("word", "position", "type", "ln weight", "ln bias"), got_grads, want_grads):
        check(f"grad {name}", g, w, 1e-5, seed)


def test_embedding_rejects_out_of_range_ids():
    ids, pos, types, tables = embedding_inputs(1, 4)
    ids[0, 2] = tables[0].shape[0]
    with pytest.raises(ValueError, match="input_ids has ids outside"):
        triton_embedding.concept_embedding(ids, pos, types, *[t.float() for t in tables], 1e-12)


# ---- attention --------------------------------------------------------------------------------------------

def attention_masks(bsz, seq_len):
    """Row 0 arbitrary (not a prefix), row 1 all padding, row 2 a short prefix, then prefixes."""
    mask = torch.rand(bsz, seq_len) < 0.7
    mask[0, 0] = True
    for b in range(1, bsz):
        mask[b] = torch.arange(seq_len) < (0 if b == 1 else random.randint(1, seq_len))
    return mask


@pytest.mark.parametrize("shape", [(3, 2, 37, 32), (1, 1, 20, 64)])
def test_attention_fp32_matches_float64_reference(shape, seed):
    qkv = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    mask = attention_masks(shape[0], shape[2])
    grad_out = torch.randn(*shape, dtype=torch.float64)
    want, want_grads = run_attention(masked_reference, qkv, mask, torch.float64, grad_out)
    got, got_grads = run_attention(triton_attention.attention, qkv, mask, torch.float32, grad_out)
    check("output", got, want, 1e-5, seed)
    for name, g, w in zip("qkv", got_grads, want_grads):
        check(f"grad {name}", g, w, 1e-5, seed)
    if shape[0] > 1:
        assert (got[1] == 0).all(), f"an all-padding sample must give zeros (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_low_precision(dtype, seed):
    shape = (3, 2, 37, 32)
    qkv = [torch.randn(*shape, dtype=dtype).double() for _ in range(3)]
    mask = attention_masks(shape[0], shape[2])
    grad_out = torch.randn(*shape, dtype=dtype).double()
    exact, exact_grads = run_attention(masked_reference, qkv, mask, torch.float64, grad_out)
    ref, ref_grads = run_attention(masked_reference, qkv, mask, dtype, grad_out)
    got, got_grads = run_attention(triton_attention.attention, qkv, mask, dtype, grad_out)
    assert got.dtype == dtype
    for name, g, r, w in zip(("output", "q", "k", "v"), [got, *got_grads], [ref, *ref_grads], [exact, *exact_grads]):
        check(name, g, w, 2 * rel(r, w) + LOWP[dtype], seed)


def test_attention_dropout_matches_masked_reference(seed):
    shape, p = (2, 2, 21, 32), 0.25
    qkv = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    mask = attention_masks(shape[0], shape[2])
    mask[1, 3] = True
    grad_out = torch.randn(*shape, dtype=torch.float64)
    torch.manual_seed(seed)
    got, got_grads = run_attention(triton_attention.attention, qkv, mask, torch.float32, grad_out, dropout_p=p)
    torch.manual_seed(seed)
    kernel_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())  # the draw the forward made
    keep = triton_attention.dropout_keep_mask(kernel_seed, shape[0], shape[1], shape[2], p, "cpu")
    assert 0.6 < keep.double().mean() < 0.9, f"keep fraction {keep.double().mean():.3f} for p={p} (seed {seed})"
    want, want_grads = run_attention(lambda q, k, v, m: masked_reference(q, k, v, m, keep, p), qkv, mask,
                                     torch.float64, grad_out)
    check("output", got, want, 1e-5, seed)
    for name, g, w in zip("qkv", got_grads, want_grads):
        check(f"grad {name}", g, w, 1e-5, seed)


def test_attention_skips_padded_blocks_instead_of_masking(seed):
    """NaN in a fully padded 16-block of q, k, v: a kernel that computed and then masked it would give NaN."""
    shape = (2, 2, 40, 32)
    mask = torch.ones(shape[0], shape[2], dtype=torch.bool)
    mask[0, 16:32] = False                            # a whole key/query block padded, real keys after it
    mask[1, 35:] = False
    qkv = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    grad_out = torch.randn(*shape, dtype=torch.float64)
    want, want_grads = run_attention(masked_reference, qkv, mask, torch.float64, grad_out)
    for t in qkv:
        t[0, :, 16:32] = float("nan")
    grad_out[0, :, 16:32] = float("nan")
    got, got_grads = run_attention(triton_attention.attention, qkv, mask, torch.float32, grad_out,
                                   block_m=16, block_n=16)
    check("output", got, want, 1e-5, seed)
    for name, g, w in zip("qkv", got_grads, want_grads):
        check(f"grad {name}", g, w, 1e-5, seed)


def test_flex_forward_matches_reference(seed):
    shape = (3, 2, 37, 32)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    mask = attention_masks(shape[0], shape[2])
    want = masked_reference(q.double(), k.double(), v.double(), mask)
    check("flex output", flex.attention(q, k, v, mask), want, 1e-5, seed)


def test_kernels_flex_selects_flex_attention_and_the_reference_embedding(seed, monkeypatch):
    """--kernels flex reaches flex.py (no constant to edit): attention through flex_attention, equal to the
    reference; the embedding seam stays on the reference."""
    shape = (2, 2, 19, 16)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    mask = attention_masks(shape[0], shape[2])
    calls = []
    monkeypatch.setattr(flex, "attention", lambda *a: calls.append(1) or flex_attention(*a))
    assert kernels.resolve("flex", torch.device("cuda")) == "flex"
    want = masked_reference(q.double(), k.double(), v.double(), mask)
    check("flex dispatch", kernels.attention(q, k, v, mask, 0.0, impl="flex"), want, 1e-5, seed)
    assert calls == [1]
    ids, pos, types, tables = embedding_inputs(2, 7)
    got = kernels.concept_embedding(ids, pos, types, *tables, 1e-12, impl="flex")
    assert torch.equal(got, reference.concept_embedding(ids, pos, types, *tables, 1e-12))


# ---- dispatch and benchmark -------------------------------------------------------------------------------

def test_dispatch_auto_is_fused_on_cuda_and_reference_elsewhere(monkeypatch):
    assert kernels.resolve("auto", torch.device("cpu")) == "torch"
    assert kernels.resolve("auto", torch.device("cuda")) == "triton"  # device type only: no GPU needed
    assert kernels.resolve("triton", torch.device("cpu")) == "triton"
    assert kernels.resolve("torch", torch.device("cuda")) == "torch"
    monkeypatch.setattr(kernels, "_triton_available", lambda: False)
    assert kernels.resolve("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="kernels='cuda'"):
        kernels.resolve("cuda", torch.device("cpu"))


PROBE = """
import torch
from mvptr_ds import kernels
q, mask = torch.randn(1, 1, 5, 16), torch.ones(1, 5, dtype=torch.bool)
try:
    print(float((kernels.attention(q, q, q, mask, impl="triton") - kernels.attention(q, q, q, mask, impl="torch"))
                .abs().max()))
except RuntimeError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("flag", [None, "0"])
def test_dispatch_triton_on_cpu_without_the_interpreter_is_refused_clearly(flag):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **({"TRITON_INTERPRET": flag} if flag else {})})
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: kernels='triton' on cpu tensors needs Triton's interpreter" in proc.stdout, proc.stdout


def test_dispatch_triton_and_torch_agree_on_real_positions(seed):
    shape = (2, 2, 19, 32)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    mask = attention_masks(2, 19)
    mask[1, :5] = True
    fused = kernels.attention(q, k, v, mask, impl="triton")
    plain = kernels.attention(q, k, v, mask, impl="torch")
    real = mask[:, None, :, None].expand_as(plain)
    check("attention", fused[real], plain[real], 1e-5, seed)
    ids, pos, types, tables = embedding_inputs(2, 6)
    args = (ids, pos, types, *[t.float() for t in tables], 1e-12)
    check("embedding", kernels.concept_embedding(*args, impl="triton"),
          kernels.concept_embedding(*args, impl="torch"), 1e-5, seed)


def test_benchmark_cpu_runs_end_to_end(tmp_path):
    out = tmp_path / "kernels.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--device", "cpu",
                           "--reps", "1", "--out", str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    names = {r["name"] for r in result["rows"]}
    assert {"embedding/text/fused", "embedding/text/reference", "attention/text/triton",
            "attention/cross/reference"} <= names, names
    assert all(r["max_rel_err"] <= 1e-5 for r in result["rows"] if r.get("max_rel_err") is not None), result
    assert result["machine"] and result["date"] and result["command"].startswith("python benchmarks/kernels.py")
    assert set(result["fastest"]) == {"attention", "embedding"}, result["fastest"]
    assert {"triton", "reference"} <= set(result["fastest"]["attention"]["correct_variants"]), result["fastest"]
