"""compress/expand on the sample pair: PEFT round trip, Eckart-Young, verification, formats."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowrank_audit.analyses.compress import compress
from lowrank_audit.formats import lowrank
from lowrank_audit.formats.lowrank import expand
from lowrank_audit.ranks import RankPolicy
from tests.conftest import SAMPLES, reference_singular_values

sys.path.insert(0, str(SAMPLES))
from tiny_llama import TinyLlamaConfig, TinyLlamaForCausalLM  # noqa: E402

BASE, FT = SAMPLES / "base.safetensors", SAMPLES / "finetuned.safetensors"
# Outputs of the adapted model against the same weights merged by hand, float32 forward passes.
OUTPUT_RTOL = 1e-5


def _model(weights: dict[str, torch.Tensor]) -> TinyLlamaForCausalLM:
    model = TinyLlamaForCausalLM(TinyLlamaConfig())
    model.load_state_dict(weights)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _apply(folder) -> tuple[torch.nn.Module, object]:
    model = _model(load_file(BASE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that lora_bias layers without a bias cannot merge
        adapted = peft.PeftModel.from_pretrained(model, folder)
        keys = adapted.load_adapter(folder, adapter_name="check")  # reports missing/unexpected keys
    adapted.set_adapter("default")
    return adapted, keys


def _merged_by_hand(folder, report) -> dict[str, torch.Tensor]:
    """Base weights plus exactly what the adapter files say: B @ A, bias deltas, saved modules."""
    weights = load_file(BASE)
    adapter = load_file(folder / "adapter_model.safetensors")
    prefix = "base_model.model."
    for row in report.to_dict("records"):
        name, module = row["name"], row["module"]
        if row["treatment"] == "lora":
            weights[name] = (
                weights[name] + adapter[f"{prefix}{module}.lora_B.weight"] @ adapter[f"{prefix}{module}.lora_A.weight"]
            )
        elif row["treatment"] == "lora_embedding":
            a, b = adapter[f"{prefix}{module}.lora_embedding_A"], adapter[f"{prefix}{module}.lora_embedding_B"]
            weights[name] = weights[name] + a.T @ b.T
        elif row["treatment"] == "lora_bias":
            weights[name] = weights[name] + adapter[f"{prefix}{module}.lora_B.bias"]
        elif row["treatment"] == "modules_to_save":
            weights[name] = adapter[f"{prefix}{name}"]
    return weights


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "a"
    return out, compress(FT, out, base=BASE, policy=RankPolicy.create(energy=0.9), method="exact", bias="lora_bias")


def test_report_records_each_input_with_its_sha256(adapter):
    import hashlib

    _, report = adapter
    inputs = report.attrs["lowrank_audit"]["inputs"]
    for key, path in (("checkpoint", FT), ("base", BASE)):
        (digest,) = inputs[key]["files"]
        assert digest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # hashed while factoring


def test_peft_loads_the_adapter_with_no_missing_or_unexpected_keys_and_our_ranks(adapter):
    out, report = adapter
    adapted, keys = _apply(out)
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    ranks = {r["module"]: r["rank"] for r in report.to_dict("records") if r["treatment"] == "lora"}
    seen = {}
    for name, module in adapted.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            seen[path] = module.r["default"]
            assert module.scaling["default"] == 1.0, path
    assert seen == ranks  # each rank_pattern key matched exactly its own module
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and sorted(config["modules_to_save"])[0] == "lm_head"


def test_adapter_outputs_match_the_report_and_full_rank_matches_the_finetune(adapter, tmp_path):
    out, report = adapter
    adapted, _ = _apply(out)
    got = _logits(adapted)
    assert _rel(got, _logits(_model(_merged_by_hand(out, report)))) < OUTPUT_RTOL
    fine_tuned = _logits(_model(load_file(FT)))
    # Negative control: at energy 0.9 the truncation shows in the outputs.
    assert _rel(got, fine_tuned) > 100 * OUTPUT_RTOL
    full = compress(
        FT, tmp_path / "full", base=BASE, policy=RankPolicy.create(energy=1.0), method="exact", bias="lora_bias"
    )
    assert (full.loc[full["treatment"] == "lora", "relative_error"] < 1e-5).all()
    assert _rel(_logits(_apply(tmp_path / "full")[0]), fine_tuned) < OUTPUT_RTOL


def test_eckart_young_reported_error_is_the_discarded_energy(adapter):
    _, report = adapter
    base, ft = load_file(BASE), load_file(FT)
    for row in report[report["treatment"] == "lora"].to_dict("records"):
        delta = (ft[row["name"]].double() - base[row["name"]].double()).numpy()
        s = reference_singular_values(delta)
        discarded = float(np.sum(s[row["rank"] :] ** 2) / np.sum(s**2))
        assert row["relative_error"] ** 2 == pytest.approx(discarded, abs=1e-5), row["name"]
        assert row["energy_kept"] == pytest.approx(1 - discarded, abs=1e-5), row["name"]
        # Negative control: one component fewer would have discarded measurably more.
        assert float(np.sum(s[row["rank"] - 1 :] ** 2) / np.sum(s**2)) - discarded > 1e-5


def test_every_changed_tensor_has_one_treatment_and_shares_add_up(adapter):
    _, report = adapter
    base, ft = load_file(BASE), load_file(FT)
    changed = {n for n in ft if not torch.equal(ft[n], base[n])}
    assert changed <= set(report["name"])
    assert report["update_share"].sum() == pytest.approx(1.0)
    assert set(report.loc[report["name"].str.endswith("norm.weight"), "treatment"]) == {"modules_to_save"}


def test_serving_safe_writes_linear_lora_only_and_reports_what_it_left_out(tmp_path):
    report = compress(FT, tmp_path / "s", base=BASE, policy=RankPolicy.create(energy=0.9), serving_safe=True)
    with safe_open(str(tmp_path / "s" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    assert not any("lm_head" in k or "embed" in k for k in keys)
    left = report[report["treatment"] == "left_out"]
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(left["name"])
    assert (left["update_share"] > 0).any() and (left["params_after"] == 0).all()
    config = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["lora_bias"] is False
    assert _apply(tmp_path / "s")[1].missing_keys == []


def test_embeddings_as_lora_load_and_apply(tmp_path):
    out = tmp_path / "e"
    policy = RankPolicy.create(energy=0.95)
    report = compress(FT, out, base=BASE, policy=policy, embeddings="lora", exclude=["*.bias"], method="exact")
    treatments = dict(zip(report["name"], report["treatment"], strict=True))
    assert treatments["model.embed_tokens.weight"] == "lora_embedding" and treatments["lm_head.weight"] == "lora"
    assert treatments["model.layers.0.self_attn.v_proj.bias"] == "left_out"
    adapted, keys = _apply(out)
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    assert _rel(_logits(adapted), _logits(_model(_merged_by_hand(out, report)))) < OUTPUT_RTOL


def test_embedding_lora_with_bias_deltas_saves_the_embedding_whole_and_says_so(tmp_path):
    with pytest.warns(UserWarning, match="PEFT cannot combine lora_bias with embedding LoRA"):
        report = compress(FT, tmp_path / "w", base=BASE, embeddings="lora", method="exact", bias="lora_bias")
    treatments = dict(zip(report["name"], report["treatment"], strict=True))
    assert treatments["model.embed_tokens.weight"] == "modules_to_save"
    assert _apply(tmp_path / "w")[1].missing_keys == []


def test_budget_is_respected_in_the_adapter(tmp_path):
    report = compress(FT, tmp_path / "b", base=BASE, policy=RankPolicy.create(budget_params=6000), method="exact")
    assert report.loc[report["treatment"] == "lora", "params_after"].sum() <= 6000


@pytest.mark.parametrize("source", ["finetuned.safetensors", "finetuned-bf16.safetensors"])
def test_factorized_checkpoint_expands_back_with_the_reported_error(tmp_path, source):
    path = SAMPLES / source
    report = compress(path, tmp_path / "lr", policy=RankPolicy.create(energy=0.8), method="exact")
    layout = lowrank.layout(tmp_path / "lr" / "model.safetensors")
    assert set(layout) == set(report.loc[report["treatment"] == "factorized", "name"]) != set()
    dense = expand(tmp_path / "lr", tmp_path / "dense.safetensors")
    original, back = load_file(path), load_file(dense)
    assert list(original) == list(back)
    rtol = 1e-5 if source == "finetuned.safetensors" else 2e-2  # bf16 stores the factors to 8 bits
    for name, tensor in original.items():
        assert back[name].shape == tensor.shape and back[name].dtype == tensor.dtype, name
        row = report[report["name"] == name]
        if name in layout:
            err = _rel(back[name].double(), tensor.double())
            assert err == pytest.approx(float(row["relative_error"].iloc[0]), rel=rtol, abs=rtol), name
        else:
            assert torch.equal(back[name], tensor), name  # copied unchanged
    # A matrix whose factors would be larger than itself stays dense.
    assert report.loc[report["treatment"] == "dense", "rank"].isna().all()
