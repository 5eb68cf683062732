"""LoRA adapters as input: the spectra of the updates they apply, from their factors.

References are PEFT's own ``get_delta_weight`` (PEFT adapters) and the dense product written
out by hand (kohya files), decomposed in float64 by NumPy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import lowrank_audit
from lowrank_audit.cli import app
from lowrank_audit.errors import CheckpointError
from lowrank_audit.io.adapters import detect, open_adapter
from tests.conftest import reference_singular_values

peft = pytest.importorskip("peft")
runner = CliRunner()
# float32 SVD of the float64 core: errors of a few eps32 * s1 (measured about 2e-7).
ADAPTER_RTOL = 1e-5


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(24, 32)
        self.down_proj = torch.nn.Linear(40, 24)
        self.emb = torch.nn.Embedding(50, 24)


def _peft_adapter(folder, *, r=16, alpha=32, rslora=False, rank4=True, seed=0):
    """A PEFT adapter saved by PEFT with random factors (PEFT starts B at zero); the q_proj
    factors hold a product of rank 4 when ``rank4``. Returns PEFT's own updates, by module."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["q_proj", "down_proj", "emb"], use_rslora=rslora,
        rank_pattern={"down_proj": 8}, alpha_pattern={"down_proj": 4},
    )  # fmt: skip
    model = peft.get_peft_model(Tiny(), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
        if rank4:
            model.base_model.model.q_proj.lora_A["default"].weight[4:] = 0.0
    model.save_pretrained(folder)
    layers = {"q_proj": model.base_model.model.q_proj, "down_proj": model.base_model.model.down_proj,
              "emb": model.base_model.model.emb}  # fmt: skip
    return {m: layer.get_delta_weight("default").detach().double() for m, layer in layers.items()}


def _rows(path, **options):
    frame = lowrank_audit.spectrum(path, device="cpu", **options)
    return {r["name"]: r for r in frame.to_dict("records")}


def _assert_spectrum(row, dense, rtol=ADAPTER_RTOL):
    want = reference_singular_values(dense)
    got = np.asarray(row["singular_values"], float)
    assert got.shape == want.shape
    err = float(np.max(np.abs(got - want))) / want[0]
    assert err <= rtol, f"{row['name']}: max |s - s_ref| / s_1 = {err:.3g}"


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_spectra_equal_peft_s_own_updates(tmp_path, rslora):
    updates = _peft_adapter(tmp_path / "adapter", rslora=rslora)
    assert detect(tmp_path / "adapter") == "peft"
    rows = _rows(tmp_path / "adapter")
    assert set(rows) == set(updates)
    for module, dense in updates.items():
        row = rows[module]
        assert row["kind"] == "adapter" and row["method"] == "exact"
        assert (row["rows"], row["cols"]) == tuple(dense.shape)
        _assert_spectrum(row, dense)
        s = reference_singular_values(dense)
        share = np.cumsum(s**2) / np.sum(s**2)
        for target, column in ((0.9, "k90"), (0.95, "k95"), (0.99, "k99")):
            assert row[column] == int(np.argmax(share >= target)) + 1, (module, column)
    # rank_pattern / alpha_pattern: down_proj has r = 8 and alpha = 4
    assert (rows["down_proj"]["adapter_rank"], rows["q_proj"]["adapter_rank"]) == (8, 16)
    scale = (lambda a, r: a / math.sqrt(r)) if rslora else (lambda a, r: a / r)
    assert rows["down_proj"]["adapter_scale"] == pytest.approx(scale(4, 8))
    assert rows["q_proj"]["adapter_scale"] == pytest.approx(scale(32, 16))
    # a product of rank 4 inside r = 16 uses 4
    assert rows["q_proj"]["numerical_rank"] == 4 and rows["q_proj"]["k99"] <= 4


def test_the_unscaled_product_fails_the_comparison(tmp_path):
    """Negative control: alpha = 32, r = 16, so B A alone is half of PEFT's update."""
    updates = _peft_adapter(tmp_path / "adapter")
    with open_adapter(tmp_path / "adapter") as adapter:
        b, a = adapter.factors("q_proj")
        unscaled = b.double() @ a.double()
    row = _rows(tmp_path / "adapter")["q_proj"]
    _assert_spectrum(row, updates["q_proj"])
    with pytest.raises(AssertionError, match="max"):
        _assert_spectrum(row, unscaled)


def test_float64_engine_matches_to_rounding(tmp_path):
    """In float64 the spectra equal the float64 product of the stored factors to rounding
    (PEFT's own update is a float32 product, 2e-8 away)."""
    from safetensors.torch import load_file

    _peft_adapter(tmp_path / "adapter")
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    factor = lambda m, w: stored[f"base_model.model.{m}.lora_{w}.weight"].double()  # noqa: E731
    dense = {"q_proj": 2.0 * factor("q_proj", "B") @ factor("q_proj", "A"),
             "down_proj": 0.5 * factor("down_proj", "B") @ factor("down_proj", "A")}  # fmt: skip
    rows = _rows(tmp_path / "adapter", dtype="float64")
    for module, want in dense.items():
        _assert_spectrum(rows[module], want, rtol=1e-12)


def _kohya(path, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "lora_te_layers_3_q.lora_down.weight": torch.randn(8, 32, generator=gen),
        "lora_te_layers_3_q.lora_up.weight": torch.randn(48, 8, generator=gen),
        "lora_te_layers_3_q.alpha": torch.tensor(4.0),
        "lora_unet_conv_in.lora_down.weight": torch.randn(4, 8, 3, 3, generator=gen),
        "lora_unet_conv_in.lora_up.weight": torch.randn(16, 4, 1, 1, generator=gen),
        # no alpha: alpha = r, scale 1
    }
    save_file(tensors, path)
    dense = {
        "lora_te_layers_3_q": 0.5
        * tensors["lora_te_layers_3_q.lora_up.weight"].double()
        @ tensors["lora_te_layers_3_q.lora_down.weight"].double(),
        "lora_unet_conv_in": tensors["lora_unet_conv_in.lora_up.weight"].double().reshape(16, 4)
        @ tensors["lora_unet_conv_in.lora_down.weight"].double().reshape(4, 72),
    }
    return dense


def test_kohya_file_linear_and_conv(tmp_path):
    dense = _kohya(tmp_path / "lora.safetensors")
    assert detect(tmp_path / "lora.safetensors") == "kohya"
    rows = _rows(tmp_path / "lora.safetensors")
    assert set(rows) == set(dense)
    for module, want in dense.items():
        _assert_spectrum(rows[module], want)
    conv = rows["lora_unet_conv_in"]
    assert (conv["rows"], conv["cols"], list(conv["shape"])) == (16, 72, [16, 8, 3, 3])
    assert (conv["adapter_rank"], conv["adapter_scale"]) == (4, 1.0)
    assert rows["lora_te_layers_3_q"]["layer"] == 3 and rows["lora_te_layers_3_q"]["adapter_scale"] == 0.5


def test_factor_balance_reads_balanced_and_unbalanced(tmp_path):
    """B = eps Q2 and A = eps Q1^T give B^T B = A A^T (imbalance 0); B * 100 and A / 100 keep
    the product and its spectrum but read as unbalanced."""
    gen = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(40, 6, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(30, 6, generator=gen, dtype=torch.float64))
    mix = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(mix)  # a balanced pair with distinct values: B = U S^½, A = S^½ Vᵀ
    s = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=torch.float64)
    b, a = q2 @ u * s.sqrt(), (s.sqrt()[:, None] * vh) @ q1.T
    for name, (bb, aa) in {"balanced": (b, a), "unbalanced": (b * 100, a / 100)}.items():
        save_file({"m.lora_down.weight": aa.float().contiguous(), "m.lora_up.weight": bb.float().contiguous(),
                   "m.alpha": torch.tensor(6.0)}, tmp_path / f"{name}.safetensors")  # fmt: skip
    balanced = _rows(tmp_path / "balanced.safetensors")["m"]
    unbalanced = _rows(tmp_path / "unbalanced.safetensors")["m"]
    assert balanced["factor_imbalance"] < 1e-6 and balanced["factor_norm_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert unbalanced["factor_imbalance"] > 0.99 and unbalanced["factor_norm_ratio"] == pytest.approx(1e4, rel=1e-4)
    np.testing.assert_allclose(balanced["singular_values"], unbalanced["singular_values"], rtol=1e-5)


def test_refusals_name_the_file_and_why(tmp_path):
    folder = tmp_path / "dora"
    _peft_adapter(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: DoRA"):
        open_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match=r"peft_type 'IA3' is not a LoRA adapter"):
        open_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config | {"r": 4}))
    with pytest.raises(CheckpointError, match=r"module 'emb': its factors have rank 16 but the config declares 4"):
        open_adapter(folder)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3, 3)}, plain)
    assert detect(plain) is None
    with pytest.raises(CheckpointError, match=r"plain\.safetensors: not a LoRA adapter"):
        open_adapter(plain)


def test_cli_audits_an_adapter_and_needs_a_matching_base_for_alignment(tmp_path):
    _peft_adapter(tmp_path / "adapter")
    result = runner.invoke(app, ["spectrum", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert "Most low-rank adapter updates (3 of 3, by k95 / r)" in result.stdout
    other = tmp_path / "other.safetensors"
    save_file({"unrelated.weight": torch.ones(3, 3)}, other)
    result = runner.invoke(app, ["spectrum", str(tmp_path / "adapter"), "--base", str(other)])
    assert result.exit_code == 2 and "no base weight for the adapter's module 'down_proj'" in result.stderr


def test_fan_in_fan_out_updates_are_transposed_like_their_base(tmp_path):
    """GPT-2's Conv1D stores its weight in x out; PEFT's update for it is (B A)ᵀ, and so is ours."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    base = transformers.GPT2LMHeadModel(config)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path / "gpt2")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    want = layer.get_delta_weight("default").detach().double()
    with open_adapter(tmp_path / "gpt2") as adapter:
        (name,) = adapter.modules
        assert adapter.modules[name].shape == tuple(layer.base_layer.weight.shape) == (32, 96)
        torch.testing.assert_close(adapter.delta(name), want, rtol=1e-5, atol=1e-6)


def test_kohya_alpha_zero_means_r_and_dora_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, 10, generator=gen), torch.randn(12, 4, generator=gen)
    save_file(
        {"m.lora_down.weight": down, "m.lora_up.weight": up, "m.alpha": torch.tensor(0.0)}, tmp_path / "z.safetensors"
    )
    with open_adapter(tmp_path / "z.safetensors") as adapter:
        assert adapter.modules["m"].scale == 1.0  # sd-scripts: alpha 0 or absent is alpha = r
    save_file({"m.lora_down.weight": down, "m.lora_up.weight": up, "m.dora_scale": torch.ones(1, 10)},
              tmp_path / "d.safetensors")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"d\.safetensors: tensor 'm\.dora_scale': DoRA"):
        open_adapter(tmp_path / "d.safetensors")


def test_pattern_keys_written_by_the_tool_match_one_module_only():
    from lowrank_audit.formats.peft import module_pattern
    from lowrank_audit.io.adapters import pattern_value

    patterns = {module_pattern("a.q"): 2}
    assert pattern_value(patterns, "a.q", 8) == 2 and pattern_value(patterns, "z.a.q", 8) == 8
    assert pattern_value({r"a\.q": 2}, "z.a.q", 8) == 2  # the unanchored key PEFT would also apply there


def test_a_base_of_another_shape_is_exit_2(tmp_path):
    gen = torch.Generator().manual_seed(5)
    save_file({"lora_q.lora_down.weight": torch.randn(2, 16, generator=gen),
               "lora_q.lora_up.weight": torch.randn(16, 2, generator=gen)}, tmp_path / "l.safetensors")  # fmt: skip
    save_file({"q.weight": torch.randn(32, 8, generator=gen)}, tmp_path / "base.safetensors")  # same numel, other shape
    result = runner.invoke(
        app, ["spectrum", str(tmp_path / "l.safetensors"), "--base", str(tmp_path / "base.safetensors")]
    )
    assert result.exit_code == 2 and "the update of the adapter's module 'lora_q' is [16, 16]" in result.stderr
