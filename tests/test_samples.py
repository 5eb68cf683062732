"""make_samples.py still makes the committed sample checkpoints, up to the CPU's vector unit.

The samples are regenerated once per module (into tmp_path) and compared with the committed
files in everything that does not depend on floating-point rounding exactly: the file list,
the JSON files and safetensors headers (byte for byte), tensor names, shapes and dtypes, token
ids, the copies within one run (shards, ``.bin``, ``.npz``, the bfloat16 cast, the truncated
file, the moments of the calibration dump, the held-out inputs of both dropout dumps).
Tensor values, spectra and ranks are compared within the tolerances below.

Why not bytes: ATen picks its CPU kernels at run time (AVX-512, AVX2 or scalar; the
``ATEN_CPU_CAPABILITY`` environment variable overrides it), and they round differently in the
last bits (FMA or not, other reduction orders, other ``exp``/``log`` approximations). 340
training steps amplify those bits, so the trained weights differ from one vector unit to the
next, while reruns on one machine stay byte-identical.

Drift measured against the committed files (made with AVX2 kernels), torch 2.13.0, by
running ``make_samples.py --out DIR`` under each capability:

=========================  ==========  ==========  ==========
largest per-tensor figure  avx2        avx512      default
=========================  ==========  ==========  ==========
float32 tensors (pair)     0           4.8e-5      6.5e-5      (model.layers.1.self_attn.k_proj.bias)
bfloat16 tensors           0           5.4e-4      5.4e-4      (a few elements one bf16 step apart)
synthetic tensors          0           0           1.8e-7      (ulps of torch.randn's vector math)
max |s - s_ref| / s_1, W   0           7.7e-7      1.5e-6
same, dW = ft - base       0           2.1e-6      2.9e-6
k90/k95/k99, signal rank   equal       equal       equal
calibration/ tensors       0           7.8e-6      1.3e-5      (an o_proj's inputs and moments)
calibration/tokens         equal       equal       equal
dropout/ tensors           0           0           1.9e-6      (fc2 of the network without dropout)
forward pass redone        0           4.5e-8      1.5e-7      (committed weights -> committed dumps)
=========================  ==========  ==========  ==========

(first three rows and the last four: relative Frobenius difference ||new - old||_F / ||old||_F,
the largest over a file's tensors.) Real changes, measured the same way, move the same figures
by much more: a fine-tuning learning rate 1 % higher moves the pair's tensors by up to 4.6e-3
and the spectra by 2.2e-3 (W) and 6e-3 (dW); one more fine-tuning step (41) by 3.3e-2 and
1.3e-2; the rank-4 noise doubled moves ``noisy_rank4.weight`` by 8.5e-4; one more fine-tuning
step moves the calibration inputs by 2.7e-3 to 9.4e-3; Adam's learning rate 1 % higher moves
the dropout sample by 3.7e-3 (without dropout) and 9.2e-3 (with). The negative controls at the
end check that the comparisons reject such changes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowrank_audit.metrics import optimal_threshold_coefficient
from tests.conftest import reference_singular_values

MODEL_FILES = ["base.safetensors", "finetuned.safetensors", "base.bin", "finetuned.bin", "finetuned-bf16.safetensors"]
SHARDED = [f"{m}-sharded/{f}" for m in ("base", "finetuned") for f in (
    "config.json", "model.safetensors.index.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")]  # fmt: skip
CALIBRATION = [f"calibration/{stem}-{i:05d}-of-{n:05d}.safetensors" for stem, n in (("dump", 4), ("heldout", 2),
               ("moments", 3)) for i in range(1, n + 1)] + [
               "calibration/tokens.safetensors", "calibration/batches.safetensors"]  # fmt: skip
LABELS = ("dropout", "no_dropout")  # the linear network trained with dropout 0.6 and without
DROPOUT = [f"dropout/{kind}-{label}.safetensors" for kind in ("activations", "weights") for label in LABELS]
SNAPSHOTS = [f"finetune-snapshots/step-{step:03d}.safetensors" for step in (0, 10, 20, 30, 40)]
FILES = sorted([*MODEL_FILES, *SHARDED, "synthetic.safetensors", "synthetic.npz", "truncated.safetensors",
                *CALIBRATION, *DROPOUT, *SNAPSHOTS])  # fmt: skip
SOURCES = {"README.md", "make_samples.py", "tiny_llama.py", "dropout_net.py", "make_lora_samples.py",
           "make_dmf_samples.py"}  # fmt: skip
OTHER_SCRIPTS = ("lora/", "dmf/")  # made by make_lora_samples.py and make_dmf_samples.py (sample_checkpoints/README.md)
JSON_FILES = [f for f in FILES if f.endswith(".json")]
TENSOR_FILES = [f for f in FILES if f.endswith((".safetensors", ".bin", ".npz")) and f != "truncated.safetensors"]

# Relative Frobenius difference per tensor of the trained pair (float32): 6.5e-5 is the most
# measured (a k_proj bias, whose gradient is nearly zero, so round-off is all that moves it),
# 15x below this; a 1 % change of the fine-tuning learning rate moves tensors by 4.6e-3.
TRAINED_RTOL = 1e-3
# Rounding to bfloat16 moves each element by at most 2**-8 of itself (8 significant bits), so
# the casts of two tensors within TRAINED_RTOL can differ by TRAINED_RTOL + 2 * 2**-8 (5.4e-4
# measured: a few elements one bf16 step apart). The exact check that the bf16 file is the
# cast of the float32 file beside it is what pins its values.
BF16_RTOL = TRAINED_RTOL + 2 * 2**-8
# Synthetic tensors are sampled and cast to float32 once, with no training: 1.8e-7 measured
# (last-bit differences in torch.randn's vector math), 50x below this; doubling the rank-4
# noise moves noisy_rank4.weight by 8.5e-4.
SYNTHETIC_RTOL = 1e-5
# max |s_i - s_ref_i| / s_ref_1 per matrix of base, finetuned and dW = finetuned - base
# (float64 SVDs): 2.9e-6 measured at most (dW), 17x below this; a fine-tuning update 0.1 %
# larger moves dW's spectrum by 1e-3 and W's by 5.6e-4.
SPECTRUM_ATOL = 5e-5
# exact_rank4 = U diag(8, 4, 2, 1) V^T cast to float32: rounding each entry moves it by at
# most 2**-24 of itself, so its spectrum moves by at most 2**-24 * sqrt(85) = 5.5e-7 (Weyl).
EXACT_RANK4_ATOL = 1e-6
# noisy_rank4 adds N(0, 1e-4**2) noise; a 96x64 Gaussian has spectral norm close to
# 1e-4 * (sqrt(96) + sqrt(64)) = 1.78e-3 (the Bai-Yin edge). The fifth singular value sits at
# the edge (1.69e-3 in the committed file), the first four move by less than the edge.
NOISE_EDGE = 1e-4 * (math.sqrt(96) + math.sqrt(64))
ENERGY_TARGETS = (0.90, 0.95, 0.99)
# Calibration data of the fine-tuned model (inputs of its nn.Linear modules, their moments):
# 1.3e-5 measured at most (an o_proj's moments, scalar kernels), 11x below this; one more
# fine-tuning step moves every module's inputs by 2.7e-3 to 9.4e-3, a fine-tuning update 1 %
# larger by 1.7e-3 to 5.2e-3.
CALIBRATION_RTOL = 1.5e-4
# The dropout sample (the linear network's weights and held-out activations): 1.9e-6 measured,
# 10x below this; Adam's learning rate 1 % higher moves them by 3.7e-3 (without dropout) and
# 9.2e-3 (with).
DROPOUT_RTOL = 2e-5
# A forward pass redone here (the committed fine-tuned weights on the committed token ids, or
# x @ fc1.weight^T) against the dumped activations: 1.5e-7 measured under other kernels than
# the ones that wrote the dump (0 under the same), 13x below this.
FORWARD_RTOL = 2e-6
# XᵀX of the dump accumulated in float64 against the moments file: a few ulps (the files come
# from one run; tests/test_activations_io.py measures below 1e-13 for such sizes).
GRAM_RTOL = 1e-12
# The fine-tuned model's nn.Linear modules: the calibration dumps hold exactly these.
LINEAR_MODULES = sorted(["lm_head"] + [
    f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")])  # fmt: skip


@pytest.fixture(scope="module")
def regenerated(samples, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no __pycache__ beside the committed files
    script = samples / "make_samples.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(params=["committed", "regenerated"])
def folder(request, samples) -> Path:
    """Checks that hold within one run of the script, for both sets of files."""
    return samples if request.param == "committed" else request.getfixturevalue("regenerated")


def capability() -> str:
    return f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".bin":
        return torch.load(path, weights_only=True)
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            return {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    return load_file(path)


def safetensors_header(data: bytes) -> bytes:
    """The length prefix and the JSON header: names, dtypes, shapes, offsets, metadata."""
    return data[: 8 + int.from_bytes(data[:8], "little")]


def relative_difference(new: torch.Tensor, old: torch.Tensor) -> float:
    """``||new - old||_F / ||old||_F`` in float64 (NaN when either holds a NaN)."""
    diff = torch.linalg.vector_norm(new.double() - old.double()).item()
    scale = torch.linalg.vector_norm(old.double()).item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def tensor_mismatches(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], rtol: float) -> list[str]:
    """What differs beyond ``rtol`` (relative Frobenius per tensor); integers must be equal."""
    if sorted(new) != sorted(old):
        return [f"names {sorted(set(new) ^ set(old))} in one file only"]
    problems = []
    for name in sorted(old):
        a, b = new[name], old[name]
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            problems.append(f"{name}: {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)}")
        elif not b.is_floating_point():
            if not torch.equal(a, b):
                problems.append(f"{name}: integer values differ")
        elif not relative_difference(a, b) <= rtol:  # `not <=` so that NaN fails
            problems.append(f"{name}: relative difference {relative_difference(a, b):.3g} > {rtol:.3g}")
    return problems


def energy_rank(s: np.ndarray, target: float) -> tuple[int, float]:
    """Smallest k with ``sum(s[:k]**2) >= target * sum(s**2)``, and the energy curve's distance
    from the target at k and k - 1 (how far the spectrum is from giving another k)."""
    share = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(share >= target)) + 1
    return k, min(abs(share[k - 1] - target), abs(share[k - 2] - target) if k > 1 else 1.0)


def signal_count(s: np.ndarray, shape: tuple[int, int]) -> tuple[int, float]:
    """Singular values above Gavish and Donoho's threshold ``omega(beta) * median(s)``, and
    the smallest distance of any of them from it."""
    tau = optimal_threshold_coefficient(min(shape) / max(shape)) * float(np.median(s))
    return int(np.count_nonzero(s > tau)), float(np.min(np.abs(s - tau)))


def spectrum_mismatches(
    new: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    old: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
) -> list[str]:
    """Compare the (base, finetuned) pairs' matrices: W of each and dW = finetuned - base.

    Singular values must agree within ``SPECTRUM_ATOL * s_1``, and k90/k95/k99 and the
    signal rank must be equal, or within 1 where the committed spectrum is so close to the
    threshold that a spectrum within tolerance could cross it (first order: the energy
    curve moves by at most ``2 * atol * s_1 * sum(s) / sum(s**2)``, the threshold by
    ``omega * atol * s_1``).
    """
    problems = []
    for name in sorted(old[1]):
        if old[1][name].ndim != 2:
            continue
        for label, get in (
            ("base", lambda pair, n=name: pair[0][n].double()),
            ("finetuned", lambda pair, n=name: pair[1][n].double()),
            ("dW", lambda pair, n=name: pair[1][n].double() - pair[0][n].double()),
        ):
            s_new, s_old = reference_singular_values(get(new)), reference_singular_values(get(old))
            where = f"{label} {name}"
            err = float(np.max(np.abs(s_new - s_old))) / s_old[0]
            if not err <= SPECTRUM_ATOL:
                problems.append(f"{where}: max |s - s_ref| / s_1 = {err:.3g} > {SPECTRUM_ATOL:.3g}")
            energy_wobble = 2 * SPECTRUM_ATOL * s_old[0] * np.sum(s_old) / np.sum(s_old**2)
            for target in ENERGY_TARGETS:
                (k_new, _), (k_old, margin) = energy_rank(s_new, target), energy_rank(s_old, target)
                if abs(k_new - k_old) > (0 if margin > energy_wobble else 1):
                    problems.append(f"{where}: k{round(target * 100)} = {k_new}, committed {k_old}")
            shape = tuple(old[1][name].shape)
            (r_new, _), (r_old, gap) = signal_count(s_new, shape), signal_count(s_old, shape)
            omega = optimal_threshold_coefficient(min(shape) / max(shape))
            if abs(r_new - r_old) > (0 if gap > (1 + omega) * SPECTRUM_ATOL * s_old[0] else 1):
                problems.append(f"{where}: signal rank {r_new}, committed {r_old}")
    return problems


def synthetic_mismatches(t: dict[str, torch.Tensor]) -> list[str]:
    """The closed-form answers of synthetic.safetensors (sample_checkpoints/README.md)."""
    problems = []
    want = np.array([8.0, 4.0, 2.0, 1.0])
    for name, atol in (("exact_rank4.weight", EXACT_RANK4_ATOL), ("noisy_rank4.weight", NOISE_EDGE)):
        s = reference_singular_values(t[name])
        if tuple(t[name].shape) != (96, 64) or not np.max(np.abs(s[:4] - want)) <= atol:
            problems.append(f"{name}: top singular values {s[:4]} not 8, 4, 2, 1 within {atol:.3g}")
        ranks = [energy_rank(s, target)[0] for target in ENERGY_TARGETS]
        if ranks != [2, 3, 4]:
            problems.append(f"{name}: k90/k95/k99 = {ranks}, not 2/3/4")
    if not reference_singular_values(t["exact_rank4.weight"])[4] <= EXACT_RANK4_ATOL:
        problems.append("exact_rank4.weight: not rank 4")
    # The noise is there and has its stated size: s_5 at the noise edge, not zero, not twice it.
    s5 = reference_singular_values(t["noisy_rank4.weight"])[4]
    if not 0.8 * NOISE_EDGE <= s5 <= 1.2 * NOISE_EDGE:
        problems.append(f"noisy_rank4.weight: s_5 = {s5:.3g}, not the noise edge {NOISE_EDGE:.3g} within 20 %")
    if signal_count(reference_singular_values(t["noisy_rank4.weight"]), (96, 64))[0] != 4:
        problems.append("noisy_rank4.weight: signal rank not 4")
    gaussians = [t["conv.weight"].reshape(16, 72), *t["experts.weight"].unbind(0)]
    if tuple(t["conv.weight"].shape) != (16, 8, 3, 3) or tuple(t["experts.weight"].shape) != (4, 32, 24):
        problems.append("conv.weight or experts.weight: wrong shape")
    elif any(signal_count(reference_singular_values(m), tuple(m.shape))[0] != 0 for m in gaussians):
        problems.append("conv.weight or an expert: a Gaussian matrix with a nonzero signal rank")
    if not torch.equal(t["norm.weight"], torch.ones(64)):
        problems.append("norm.weight: not 64 ones")
    if (t["row.weight"].dtype, tuple(t["row.weight"].shape)) != (torch.float32, (1, 64)):
        problems.append("row.weight: not a float32 1x64 matrix")
    if not torch.equal(t["token_ids"], torch.arange(12, dtype=torch.int64).reshape(3, 4)):
        problems.append("token_ids: not arange(12) as 3x4 int64")
    return problems


def rtol_for(name: str) -> float:
    if name.startswith("synthetic"):
        return SYNTHETIC_RTOL
    if name.startswith("calibration/"):
        return CALIBRATION_RTOL
    if name.startswith("dropout/"):
        return DROPOUT_RTOL
    return BF16_RTOL if "bf16" in name else TRAINED_RTOL


def data_files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and p.name not in SOURCES and "__pycache__" not in p.parts
        and not str(p.relative_to(folder)).startswith(OTHER_SCRIPTS)
    )  # fmt: skip


def test_file_lists_are_the_same(samples, regenerated):
    assert data_files(regenerated) == FILES
    assert data_files(samples) == FILES


@pytest.mark.parametrize("name", JSON_FILES)
def test_json_files_are_byte_identical(samples, regenerated, name):
    # config.json comes from the config dataclass, the index from tensor names and byte sizes:
    # no floating-point arithmetic, so the bytes are the same on every CPU.
    assert (regenerated / name).read_bytes() == (samples / name).read_bytes()
    assert json.loads((samples / name).read_text())


@pytest.mark.parametrize("name", [f for f in FILES if f.endswith(".safetensors")])
def test_safetensors_headers_are_byte_identical(samples, regenerated, name):
    # Names, dtypes, shapes, offsets and metadata; only the data after the header depends on rounding.
    new, old = (regenerated / name).read_bytes(), (samples / name).read_bytes()
    assert len(new) == len(old)
    assert safetensors_header(new) == safetensors_header(old)


@pytest.mark.parametrize("name", TENSOR_FILES)
def test_tensors_are_close_to_the_committed_ones(samples, regenerated, name):
    new, old = load_tensors(regenerated / name), load_tensors(samples / name)
    assert tensor_mismatches(new, old, rtol_for(name)) == [], capability()


def test_copies_within_one_run_are_identical(folder):
    """Shards, .bin, .npz and the bfloat16 cast hold exactly the tensors of their source file."""
    for model in ("base", "finetuned"):
        whole = load_tensors(folder / f"{model}.safetensors")
        shards = {}
        for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            shards.update(load_tensors(folder / f"{model}-sharded" / shard))
        for copy in (shards, load_tensors(folder / f"{model}.bin")):
            assert tensor_mismatches(copy, whole, rtol=0.0) == [], model
        assert len(whole) == 27 and all(t.dtype == torch.float32 for t in whole.values())
    # Rounding to bfloat16 is exactly defined (round to nearest even), whatever the vector unit.
    finetuned = load_tensors(folder / "finetuned.safetensors")
    bf16 = {name: t.bfloat16() for name, t in finetuned.items()}
    assert tensor_mismatches(load_tensors(folder / "finetuned-bf16.safetensors"), bf16, rtol=0.0) == []
    synthetic = load_tensors(folder / "synthetic.safetensors")
    assert tensor_mismatches(load_tensors(folder / "synthetic.npz"), synthetic, rtol=0.0) == []


def test_truncated_file_is_the_first_half_of_synthetic(folder):
    whole = (folder / "synthetic.safetensors").read_bytes()
    assert (folder / "truncated.safetensors").read_bytes() == whole[: len(whole) // 2]


def test_trained_pair_spectra_and_ranks_match(samples, regenerated):
    def pair(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return load_tensors(folder / "base.safetensors"), load_tensors(folder / "finetuned.safetensors")

    assert spectrum_mismatches(pair(regenerated), pair(samples)) == [], capability()


def test_synthetic_known_answers(folder):
    assert synthetic_mismatches(load_tensors(folder / "synthetic.safetensors")) == []


def sample_scripts() -> tuple[ModuleType, ModuleType, ModuleType]:
    """``make_samples``, ``tiny_llama`` and ``dropout_net`` from sample_checkpoints/, imported
    without writing ``__pycache__`` beside the committed files."""
    saved_path, saved_flag = list(sys.path), sys.dont_write_bytecode
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sample_checkpoints"))
    sys.dont_write_bytecode = True
    try:
        import dropout_net
        import make_samples
        import tiny_llama
    finally:
        sys.path[:], sys.dont_write_bytecode = saved_path, saved_flag
    return make_samples, tiny_llama, dropout_net


def read_shards(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """All tensors of ``calibration/<stem>-*.safetensors``; each module lies whole in one shard."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted((folder / "calibration").glob(f"{stem}-*.safetensors")):
        part = load_tensors(path)
        assert not set(part) & set(out), f"{path}: a module in two shards"
        out.update(part)
    return out


def linear_inputs_of(state: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the tiny LLaMA with weights ``state`` feeds its nn.Linear modules on token ids ``ids``."""
    make_samples, tiny_llama, _ = sample_scripts()
    model = tiny_llama.TinyLlamaForCausalLM(tiny_llama.TinyLlamaConfig())
    model.load_state_dict(state)
    return make_samples.linear_inputs(model, lambda: model(ids))


def test_calibration_dumps_are_the_fine_tuned_models_linear_inputs(folder):
    tokens = load_tensors(folder / "calibration" / "tokens.safetensors")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tokens.items()} == {
        "calibration": (torch.int64, (8, 32)), "heldout": (torch.int64, (4, 32))}  # fmt: skip
    assert all(int(v.min()) >= 0 and int(v.max()) < 96 for v in tokens.values())
    assert not torch.equal(tokens["calibration"][:4], tokens["heldout"])
    finetuned = load_tensors(folder / "finetuned.safetensors")
    for stem, key, rows in (("dump", "calibration", 8), ("heldout", "heldout", 4)):
        dump = read_shards(folder, stem)
        assert sorted(dump) == LINEAR_MODULES
        assert all(tuple(t.shape[:2]) == (rows, 32) and t.dtype == torch.float32 for t in dump.values())
        assert tensor_mismatches(dump, linear_inputs_of(finetuned, tokens[key]), FORWARD_RTOL) == [], capability()


def moments_mismatches(got: dict, want: dict) -> list[str]:
    """Compare two ``read_activations`` results: rows exactly, XᵀX and the row sum within GRAM_RTOL."""
    if sorted(got) != sorted(want):
        return [f"modules {sorted(set(got) ^ set(want))} in one only"]
    problems = []
    for name in sorted(want):
        a, b = got[name], want[name]
        if (a.count, a.nonfinite) != (b.count, b.nonfinite):
            problems.append(f"{name}: {a.count} rows ({a.nonfinite} non-finite), want {b.count} ({b.nonfinite})")
        for part in ("xtx", "total"):
            x, y = getattr(a, part), getattr(b, part)
            if x.shape != y.shape or not float((x - y).abs().max()) <= GRAM_RTOL * float(y.abs().max()):
                problems.append(f"{name}: .{part} differs")
    return problems


def test_calibration_moments_are_the_moments_of_the_dump(folder):
    from lowrank_audit.io.activations import is_moments, read_activations

    moments_files = sorted((folder / "calibration").glob("moments-*.safetensors"))
    dump_files = sorted((folder / "calibration").glob("dump-*.safetensors"))
    assert all(is_moments(p) for p in moments_files) and not any(is_moments(p) for p in dump_files)
    moments = read_activations(moments_files)
    assert {m.count for m in moments.values()} == {256} and {m.nonfinite for m in moments.values()} == {0}
    assert moments_mismatches(moments, read_activations(dump_files)) == []


def test_dropout_sample_within_one_run(folder):
    acts = {label: load_tensors(folder / f"dropout/activations-{label}.safetensors") for label in LABELS}
    # Both networks saw the same held-out inputs; only what they make of them differs.
    assert torch.equal(acts["dropout"]["fc1"], acts["no_dropout"]["fc1"])
    for label, got in acts.items():
        weights = load_tensors(folder / f"dropout/weights-{label}.safetensors")
        assert {k: tuple(v.shape) for k, v in weights.items()} == {"fc1.weight": (128, 64), "fc2.weight": (64, 128)}
        assert {k: tuple(v.shape) for k, v in got.items()} == {"fc1": (384, 64), "fc2": (384, 128)}
        # fc2's input is fc1's output: the dump is the hidden layer of the weights beside it.
        hidden = got["fc1"].double() @ weights["fc1.weight"].double().T
        assert relative_difference(got["fc2"], hidden) <= FORWARD_RTOL, label


# Negative controls: the comparisons above reject real changes to the samples.


def one_more_sgd_step(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` after one more plain SGD step (lr 0.1, batch 128) on the base task (the first
    thing make_samples.py draws from its seeded generator)."""
    make_samples, tiny_llama, _ = sample_scripts()
    model = tiny_llama.TinyLlamaForCausalLM(tiny_llama.TinyLlamaConfig())
    model.load_state_dict(state)
    gen = torch.Generator().manual_seed(make_samples.SEED)
    task = make_samples.markov_chain(model.config.vocab_size, 4, gen)
    make_samples.train(model, task, torch.optim.SGD(model.parameters(), lr=0.1), 1, 128, gen)
    return make_samples.state_dict(model)


def test_comparisons_reject_one_more_training_step(regenerated):
    base = load_tensors(regenerated / "base.safetensors")
    finetuned = load_tensors(regenerated / "finetuned.safetensors")
    stepped = one_more_sgd_step(finetuned)
    # Measured: tensors move by up to 6e-2, spectra by 7e-3 (W) and 1.1e-2 (dW).
    assert tensor_mismatches(finetuned, finetuned, TRAINED_RTOL) == []
    assert len(tensor_mismatches(stepped, finetuned, TRAINED_RTOL)) >= 10
    problems = spectrum_mismatches((base, stepped), (base, finetuned))
    assert sum("max |s - s_ref|" in p for p in problems) >= 16, problems


def test_spectra_reject_a_fine_tuning_update_0_1_percent_larger(regenerated):
    base = load_tensors(regenerated / "base.safetensors")
    finetuned = load_tensors(regenerated / "finetuned.safetensors")
    larger = {n: (base[n].double() + 1.001 * (finetuned[n].double() - base[n].double())).float() for n in base}
    # Measured: dW's spectra move by 1.0e-3 of s_1, 20x SPECTRUM_ATOL; tensors by 9e-4, within
    # TRAINED_RTOL, so the spectra are the finer check.
    problems = spectrum_mismatches((base, larger), (base, finetuned))
    assert sum(p.startswith("dW") and "max |s - s_ref|" in p for p in problems) == 16, problems


def test_synthetic_checks_reject_doubled_noise(regenerated):
    synthetic = load_tensors(regenerated / "synthetic.safetensors")
    exact, noisy = synthetic["exact_rank4.weight"].double(), synthetic["noisy_rank4.weight"].double()
    doubled = {**synthetic, "noisy_rank4.weight": (exact + 2 * (noisy - exact)).float()}
    problems = tensor_mismatches(doubled, synthetic, SYNTHETIC_RTOL)  # 8.5e-4 measured
    assert len(problems) == 1 and problems[0].startswith("noisy_rank4.weight: relative difference"), problems
    assert [p for p in synthetic_mismatches(doubled) if "s_5" in p]
    noiseless = {**synthetic, "noisy_rank4.weight": synthetic["exact_rank4.weight"]}
    assert [p for p in synthetic_mismatches(noiseless) if "s_5" in p]


def test_calibration_checks_reject_one_more_training_step(regenerated):
    tokens = load_tensors(regenerated / "calibration" / "tokens.safetensors")
    dump = read_shards(regenerated, "dump")
    stepped_weights = one_more_sgd_step(load_tensors(regenerated / "finetuned.safetensors"))
    stepped = linear_inputs_of(stepped_weights, tokens["calibration"])
    # Measured: every module's inputs move by 2.7e-3 to 9.4e-3, 18x CALIBRATION_RTOL and more.
    assert len(tensor_mismatches(stepped, dump, CALIBRATION_RTOL)) == len(LINEAR_MODULES)
    # The moments check tells the calibration rows from the held-out ones.
    from lowrank_audit.io.activations import read_activations

    moments = read_activations(sorted((regenerated / "calibration").glob("moments-*.safetensors")))
    held_out = read_activations(sorted((regenerated / "calibration").glob("heldout-*.safetensors")))
    problems = moments_mismatches(moments, held_out)
    assert sum("rows" in p for p in problems) == len(LINEAR_MODULES), problems
    assert sum(".xtx differs" in p for p in problems) == len(LINEAR_MODULES), problems


def test_dropout_checks_reject_a_hidden_layer_0_1_percent_larger(regenerated):
    acts = load_tensors(regenerated / "dropout/activations-dropout.safetensors")
    larger = {**acts, "fc2": acts["fc2"] * 1.001}
    problems = tensor_mismatches(larger, acts, DROPOUT_RTOL)  # 1e-3, 50x DROPOUT_RTOL
    assert len(problems) == 1 and problems[0].startswith("fc2: relative difference"), problems
    weights = load_tensors(regenerated / "dropout/weights-dropout.safetensors")
    hidden = larger["fc1"].double() @ weights["fc1.weight"].double().T
    assert not relative_difference(larger["fc2"], hidden) <= FORWARD_RTOL


def test_tensor_comparison_rejects_nan_dtype_shape_and_names(regenerated):
    finetuned = load_tensors(regenerated / "finetuned.safetensors")
    name = "lm_head.weight"
    with_nan = {**finetuned, name: finetuned[name].clone()}
    with_nan[name][0, 0] = math.nan
    for changed in (
        with_nan,
        {**finetuned, name: finetuned[name].half()},
        {**finetuned, name: finetuned[name][:, :-1].contiguous()},
    ):
        assert len(tensor_mismatches(changed, finetuned, TRAINED_RTOL)) == 1
    assert tensor_mismatches({k: v for k, v in finetuned.items() if k != name}, finetuned, TRAINED_RTOL)


def test_sample_files_stay_small(samples):
    for path in samples.rglob("*"):
        if path.is_file():
            assert path.stat().st_size < 400_000, path


def test_finetune_snapshots_run_from_the_base_to_the_finetune(samples):
    """The first snapshot is the base and the last the fine-tune, bit for bit."""
    first = load_tensors(samples / SNAPSHOTS[0])
    last = load_tensors(samples / SNAPSHOTS[-1])
    base, finetuned = load_tensors(samples / "base.safetensors"), load_tensors(samples / "finetuned.safetensors")
    assert first.keys() == base.keys() and all(torch.equal(first[k], base[k]) for k in base)
    assert last.keys() == finetuned.keys() and all(torch.equal(last[k], finetuned[k]) for k in finetuned)
