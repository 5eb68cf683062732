"""capture: Linear inputs into moments or raw rows, through the library and the CLI."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_audit.analyses.capture import capture, capture_to_file
from lowrank_audit.errors import CheckpointError, NoMatricesSelected, OptionError
from lowrank_audit.io.activations import Moments, read_activations, write_dumps
from lowrank_audit.io.model_inputs import load_model, open_batches
from tests.conftest import SAMPLES
from tests.test_activations_io import GRAM_RTOL
from tests.test_cli import assert_one_line_error, invoke

HELPER = "capture_helper_models"
# Written to tmp_path and imported from there, as a user's own module would be.
HELPER_SOURCE = f'''
import sys
import torch
from torch import nn
from safetensors.torch import load_file


class Block(nn.Module):
    """Attention-like block: q/k/v read one normalized tensor, up/gate another."""

    def __init__(self, d=16, h=24):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.gate, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.unused = nn.Linear(d, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, features, mask, shift=None):
        y = self.norm(features)
        # shift, per batch: k reads another tensor than q and v on batches that ask for it.
        k_in = y + 1.0 if shift is not None and bool(shift.any()) else y
        q, v, k = self.q(y), self.v(y), self.k(k_in)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4 + (mask[:, None, :] - 1) * 1e4, dim=-1)
        x = features + self.drop(self.o(att @ v))
        z = self.norm(x)
        return x + self.down(torch.relu(self.up(z)) * self.gate(z))


def build():
    torch.manual_seed(0)
    return Block()


def tiny_llama():
    sys.path.insert(0, {str(SAMPLES)!r})
    from tiny_llama import TinyLlamaConfig, TinyLlamaForCausalLM

    model = TinyLlamaForCausalLM(TinyLlamaConfig())
    model.load_state_dict(load_file({str(SAMPLES / "base.safetensors")!r}))
    return model


not_callable = 3


def returns_int():
    return 3


def raises():
    raise RuntimeError("no weights here\\nsecond line")


def needs_arg(size):
    return Block(size)
'''


@pytest.fixture
def helper(tmp_path, monkeypatch):
    """Builds a model of the helper module written to tmp_path, the current directory (not on
    sys.path: it is found by --model's rule); the module is imported afresh by each test."""
    (tmp_path / f"{HELPER}.py").write_text(textwrap.dedent(HELPER_SOURCE))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop(HELPER, None)
    yield lambda factory="build": load_model(f"{HELPER}:{factory}")
    sys.modules.pop(HELPER, None)


def _block_batches(path, rows=22, shift=False):
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(rows, 5, dtype=torch.int64)
    mask[::3, 3:] = 0
    tensors = {"features": torch.randn(rows, 5, 16, generator=gen), "mask": mask}
    if shift:
        tensors["shift"] = (torch.arange(rows) // 4 % 2).to(torch.int64)  # batches of 4: odd ones shift
    save_file(tensors, path)
    return path


def _llama_batches(path, rows=20):
    save_file({"ids": torch.randint(0, 96, (rows, 12), generator=torch.Generator().manual_seed(2))}, path)
    return path


def _close(got, want, rtol=GRAM_RTOL) -> bool:
    return float((got - want).abs().max()) <= rtol * float(want.abs().max())


def _reference(model, batches, names):
    """Each module's rows, recorded by plain hooks: the float64 reference."""
    rows = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: rows[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n in names]  # fmt: skip
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(r).double() for n, r in rows.items()}


def test_capture_equals_accumulating_raw_dumps_of_the_sample_model(helper, tmp_path):
    """Moments equal the raw rows accumulated by read_activations; a dump that kept fewer rows
    (the negative control) does not."""
    model = helper("tiny_llama")
    batches = open_batches(_llama_batches(tmp_path / "b.safetensors"), batch_size=6)
    moments = capture(model, batches).moments
    raw = capture(model, batches, raw=True, max_rows=10_000)
    write_dumps(raw.rows, tmp_path / "raw.safetensors")
    dumped = read_activations([tmp_path / "raw.safetensors"])
    assert sorted(moments) == sorted(dumped) and len(moments) == 15
    for name, m in moments.items():
        assert m.count == dumped[name].count == 240 and m.nonfinite == 0
        assert _close(m.xtx, dumped[name].xtx), name
        assert _close(m.total, dumped[name].total), name
    with pytest.warns(UserWarning, match="capped at --max-rows 200"):
        short = capture(model, batches, raw=True, max_rows=200)
    write_dumps(short.rows, tmp_path / "short.safetensors")
    cut = read_activations([tmp_path / "short.safetensors"])["model.layers.1.mlp.down_proj"]
    assert cut.count == 200 and not _close(cut.xtx, moments["model.layers.1.mlp.down_proj"].xtx)


def test_moments_match_a_float64_reference_including_shared_inputs(helper, tmp_path):
    model = helper()
    batches = open_batches(_block_batches(tmp_path / "b.safetensors"), batch_size=4)
    with pytest.warns(UserWarning, match="1 selected Linear modules never ran.*unused"):
        result = capture(model, batches)
    assert result.groups == (("gate", "up"), ("k", "q", "v")) and result.batches == 6
    ref = _reference(model, batches, ["q", "k", "v", "o", "up", "gate", "down"])
    for name, rows in ref.items():
        assert result.moments[name].count == result.seen[name] == 110
        assert _close(result.moments[name].xtx, rows.T @ rows), name
        assert _close(result.moments[name].total, rows.sum(0)), name
    # Shared moments are the same numbers held in separate tensors (safetensors needs that).
    assert torch.equal(result.moments["q"].xtx, result.moments["k"].xtx)
    assert result.moments["q"].xtx.data_ptr() != result.moments["k"].xtx.data_ptr()
    # Negative control: o reads another tensor, and its moments differ beyond tolerance.
    assert not _close(result.moments["o"].xtx, ref["q"].T @ ref["q"])


def test_inputs_that_stop_being_shared_split_the_accumulator(helper, tmp_path):
    """k reads q's tensor on the first batch and another on every other one: its moments are
    still its own, and q and v keep theirs."""
    model = helper()
    batches = open_batches(_block_batches(tmp_path / "b.safetensors", rows=16, shift=True), batch_size=4)
    result = capture(model, batches, include=["q", "k", "v"])
    assert result.groups == (("q", "v"),)
    ref = _reference(model, batches, ["q", "k", "v"])
    for name in ("q", "k", "v"):
        assert _close(result.moments[name].xtx, ref[name].T @ ref[name]), name
    assert not _close(result.moments["k"].xtx, ref["q"].T @ ref["q"])


def test_include_exclude_raw_cap_and_restored_state(helper, tmp_path):
    model = helper().train()
    batches = open_batches(_block_batches(tmp_path / "b.safetensors"), batch_size=4)
    calls = []
    with pytest.warns(UserWarning, match="capped at --max-rows 30: 1 modules saw more"):
        result = capture(model, batches, include=["*o*"], exclude=["down"], raw=True, max_rows=30,
                         progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    assert model.training and model.drop.training  # modes restored
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed
    assert sorted(result.rows) == ["o"]  # "down" matches *o* but is excluded
    assert result.rows["o"].shape == (30, 16) and result.seen["o"] == 110
    assert calls == [(i, 6) for i in range(1, 7)]
    # The first rows in batch order (batch 0 holds 4 x 5 token rows, so 30 reach into batch 1).
    ref = _reference(model, batches, ["o"])["o"]
    assert torch.equal(result.rows["o"].double(), ref[:30])
    with pytest.raises(NoMatricesSelected, match="no nn.Linear module matches"):
        capture(model, batches, include=["nothing*"])


def test_hooks_are_removed_when_the_forward_fails(helper):
    model = helper()
    with pytest.raises(TypeError):
        capture(model, [{"wrong": torch.zeros(2, 5, 16)}])
    assert not any(m._forward_pre_hooks for m in model.modules())


class _ReusesItsInput(nn.Module):
    """Zeroes a Linear layer's input in place once the layer has read it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        h = self.a(x)
        x.mul_(0)
        return self.b(h + x)


@pytest.mark.parametrize("raw", [False, True])
def test_rows_are_recorded_as_the_layer_saw_them(raw):
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(4))
    result = capture(_ReusesItsInput(), [x], raw=raw)
    rows = x.reshape(-1, 4).double()
    got = result.rows["a"].double() if raw else result.moments["a"].xtx
    want = rows if raw else rows.T @ rows
    assert _close(got, want) and float(want.abs().max()) > 0.1  # the zeroed tensor would give 0


def test_nonfinite_rows_are_left_out_and_counted():
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    x[2, 1] = float("nan")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        m = capture(model, [x]).moments["0"]
    good = torch.cat([x[:2], x[3:]]).double()
    assert m.count == 9 and m.nonfinite == 1 and _close(m.xtx, good.T @ good)


def test_library_and_cli_write_the_same_moments(helper, tmp_path):
    batches_path = _block_batches(tmp_path / "b.safetensors")
    result = invoke("capture", "--model", f"{HELPER}:build", "--inputs", batches_path, "--out", "acts.safetensors",
                    "--batch-size", "4", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "moments of 7 Linear inputs over 6 batches written to acts.safetensors" in result.stdout
    assert "Warning: 1 selected Linear modules never ran" in result.stderr
    written = read_activations([tmp_path / "acts.safetensors"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        library = capture(helper(), open_batches(batches_path, batch_size=4)).moments
    assert sorted(written) == sorted(library)
    for name, m in library.items():
        assert torch.equal(written[name].xtx, m.xtx) and torch.equal(written[name].total, m.total), name
        assert written[name].count == m.count == 110


def test_cli_raw_dumps_and_json(helper, tmp_path):
    batches_path = _llama_batches(tmp_path / "b.safetensors")
    result = invoke("capture", "-m", f"{HELPER}:tiny_llama", "--inputs", batches_path, "-o", "raw.safetensors",
                    "--raw", "--max-rows", "50", "-i", "*.0.self_attn.*", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kind"] == "dumps" and summary["batches"] == 3
    assert {m["module"]: (m["rows"], m["kept"]) for m in summary["modules"]} == {
        f"model.layers.0.self_attn.{p}": (240, 50) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    dumps = load_file(tmp_path / "raw.safetensors")
    assert {t.shape for t in dumps.values()} == {torch.Size([50, 64])}
    assert torch.equal(dumps["model.layers.0.self_attn.q_proj"], dumps["model.layers.0.self_attn.k_proj"])


def test_output_is_refused_unless_forced_and_never_an_input(helper, tmp_path):
    batches_path = _block_batches(tmp_path / "b.safetensors")
    out = tmp_path / "acts.safetensors"
    out.write_bytes(b"old")
    args = ("capture", "--model", f"{HELPER}:build", "--inputs", batches_path, "--out", out, "-q")
    assert_one_line_error(invoke(*args), str(out), "--force")
    assert out.read_bytes() == b"old"
    assert invoke(*args, "--force").exit_code == 0
    assert read_activations([out])["q"].count == 110
    assert_one_line_error(invoke(*args[:-3], "--out", batches_path, "--force"), "would overwrite input")
    assert load_file(batches_path)["features"].shape == (22, 5, 16)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
        (f"{HELPER}:missing", "has no attribute 'missing'"),
        (f"{HELPER}:not_callable", "'not_callable' is a int, not a callable"),
        (f"{HELPER}:returns_int", "returned a int, not a torch.nn.Module"),
        (f"{HELPER}:raises", "raised RuntimeError: no weights here second line"),
        (f"{HELPER}:needs_arg", "raised TypeError"),
        (HELPER, "must be MODULE:CALLABLE"),
    ],
)
def test_bad_model_exits_2_with_one_line(helper, tmp_path, spec, fragment):
    batches_path = _block_batches(tmp_path / "b.safetensors")
    result = invoke("capture", "--model", spec, "--inputs", batches_path, "--out", "acts.safetensors")
    assert_one_line_error(result, f"--model {spec}", fragment)
    assert not (tmp_path / "acts.safetensors").exists()


def test_bad_batch_files_exit_2_naming_file_and_tensor(helper, tmp_path):
    uneven = tmp_path / "uneven.safetensors"
    save_file({"features": torch.zeros(6, 5, 16), "mask": torch.ones(5, 5, dtype=torch.int64)}, uneven)
    args = ("capture", "--model", f"{HELPER}:build", "--out", "acts.safetensors", "--inputs")
    assert_one_line_error(invoke(*args, uneven), str(uneven), "'mask' has 5 rows", "'features' has 6")
    scalar = tmp_path / "scalar.safetensors"
    save_file({"features": torch.zeros(6, 5, 16), "scale": torch.tensor(2.0)}, scalar)
    assert_one_line_error(invoke(*args, scalar), str(scalar), "'scale' is 0-D")
    assert_one_line_error(invoke(*args, tmp_path / "none.safetensors"), "none.safetensors: no such batch file")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert_one_line_error(invoke(*args, tmp_path / "junk.safetensors"), "junk.safetensors: cannot read batches")
    # Tensors the model does not take: the forward pass fails, named with the inputs.
    wrong = tmp_path / "wrong.safetensors"
    save_file({"input_ids": torch.zeros(4, 5, dtype=torch.int64)}, wrong)
    assert_one_line_error(invoke(*args, wrong), f"--model {HELPER}:build", "forward pass on", "TypeError")
    assert not (tmp_path / "acts.safetensors").exists()


def test_library_validation_raises_our_errors(helper, tmp_path):
    with pytest.raises(OptionError, match="batch-size must be a positive integer but got 0"):
        open_batches(_block_batches(tmp_path / "b.safetensors"), batch_size=0)
    with pytest.raises(OptionError, match="max-rows must be a positive integer but got 0"):
        capture(helper(), [], raw=True, max_rows=0)
    with pytest.raises(CheckpointError, match="no such batch file"):
        open_batches(tmp_path / "absent.safetensors")


def test_model_is_imported_from_the_current_directory_which_leaves_sys_path_again(helper, tmp_path):
    before = list(sys.path)
    assert str(tmp_path) not in before and HELPER not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(HELPER)  # negative control: not importable without the rule
    assert isinstance(load_model(f"{HELPER}:build"), nn.Module)
    assert sys.path == before


def test_a_bug_in_our_hooks_is_not_reported_as_a_bad_model(helper, tmp_path, monkeypatch):
    def broken(self, rows):
        raise ZeroDivisionError("our bug")

    monkeypatch.setattr(Moments, "add", broken)
    with pytest.raises(ZeroDivisionError, match="our bug"):
        capture_to_file(f"{HELPER}:build", _block_batches(tmp_path / "b.safetensors"), tmp_path / "a.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_on_cuda_matches_the_cpu(helper, tmp_path):
    batches = open_batches(_llama_batches(tmp_path / "b.safetensors"), batch_size=6)
    on_cpu = capture(helper("tiny_llama"), batches).moments
    on_gpu = capture(helper("tiny_llama").cuda(), batches).moments
    for name, m in on_cpu.items():
        assert on_gpu[name].xtx.device.type == "cpu"
        # Different float32 kernels feed the layers: inputs agree to float32 rounding, not bits.
        assert _close(on_gpu[name].xtx, m.xtx, rtol=1e-4), name


def test_cli_defaults_are_the_library_defaults():
    from lowrank_audit.analyses.capture import DEFAULT_MAX_ROWS
    from lowrank_audit.cli.capture import capture as command
    from lowrank_audit.io.model_inputs import DEFAULT_BATCH_SIZE

    params = inspect.signature(command).parameters
    assert (params["batch_size"].default, params["max_rows"].default) == (DEFAULT_BATCH_SIZE, DEFAULT_MAX_ROWS)
