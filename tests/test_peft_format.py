"""Adapters as PEFT loads and merges them: bias modes, base model name and task type.

The sample pair's Hugging Face folders (``base-sharded``, ``finetuned-sharded``) load as a
transformers ``LlamaForCausalLM``; every claim about PEFT here is checked with peft itself.
"""

from __future__ import annotations

import json
import shutil
import warnings

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lowrank_audit.analyses.compress import compress
from lowrank_audit.cli import app
from lowrank_audit.errors import OptionError
from lowrank_audit.formats import peft as peft_format
from lowrank_audit.io.checkpoint import open_checkpoint
from lowrank_audit.ranks import RankPolicy
from tests.conftest import SAMPLES

BASE, FT = SAMPLES / "base-sharded", SAMPLES / "finetuned-sharded"
FULL = RankPolicy.create(energy=1.0)  # every component: the adapter is the update up to float32 rounding
# Full-rank adapter against the fine-tune, float32 forward passes: 2e-7 relative measured
# (B @ A rounds each update to about 1e-6 of itself).
OUTPUT_RTOL = 1e-5
MERGE_FAILURE = "Impossible to merge LoRA with `lora_bias=True`"
runner = CliRunner()


def _load(folder) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _adapted(folder) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: lora_bias on layers without a bias cannot merge
        return peft.PeftModel.from_pretrained(_load(BASE), folder)


def _lora_layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def _weights(folder) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as ckpt:
        return {n: ckpt[n] for n in ckpt}


@pytest.fixture(scope="module")
def fine_tuned() -> torch.Tensor:
    return _logits(_load(FT))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bias")
    made = {}
    for mode in ("fold", "lora_bias", "leave_out"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the lora_bias warning has its own test
            report = compress(FT, root / mode, base=BASE, policy=FULL, method="exact", bias=mode)
        made[mode] = (root / mode, report)
    return made


def _treatments(report) -> dict[str, str]:
    return dict(zip(report["name"], report["treatment"], strict=True))


def test_lora_bias_warns_at_compress_time(tmp_path):
    with pytest.warns(UserWarning, match=r"lora_bias and 8 LoRA layers have no bias in the base .*merge_and_unload"):
        compress(FT, tmp_path / "a", base=BASE, policy=FULL, method="exact", bias="lora_bias")


def test_peft_merge_of_a_lora_bias_adapter_fails_half_way_and_leaves_the_model_partly_merged(adapters, fine_tuned):
    out, report = adapters["lora_bias"]
    assert set(_treatments(report).values()) >= {"lora_bias"}
    adapted = _adapted(out)
    assert _rel(_logits(adapted), fine_tuned) < OUTPUT_RTOL  # loads and applies
    with torch.no_grad(), pytest.raises(RuntimeError, match=MERGE_FAILURE):
        adapted.merge_and_unload()
    # Layers before the first one without a bias were merged and unwrapped; the rest were not,
    # and the failing layer kept its weight delta as well as its LoRA: the outputs are wrong.
    left = _lora_layers(adapted)
    assert len(left) == 10 and left[0].endswith("layers.0.mlp.gate_proj")
    failed = adapted.get_submodule(left[0]).base_layer.weight
    assert _rel(failed, _weights(FT)["model.layers.0.mlp.gate_proj.weight"]) < OUTPUT_RTOL  # and LoRA on top
    assert _rel(_logits(adapted), fine_tuned) > 0.01


def test_folded_bias_loads_applies_and_merges_into_the_finetune(adapters, fine_tuned):
    out, report = adapters["fold"]
    treatments = _treatments(report)
    assert treatments["model.layers.0.self_attn.q_proj.bias"] == "folded_bias"
    assert "lora_bias" not in treatments.values()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only" and config["lora_bias"] is False
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.self_attn.v_proj.base_layer.bias" in keys
    assert not any(k.endswith("lora_B.bias") for k in keys)
    adapted = peft.PeftModel.from_pretrained(_load(BASE), out)
    assert _rel(_logits(adapted), fine_tuned) < OUTPUT_RTOL
    with torch.no_grad():
        merged = adapted.merge_and_unload()
    assert isinstance(merged, transformers.LlamaForCausalLM) and _lora_layers(merged) == []
    assert _rel(_logits(merged), fine_tuned) < OUTPUT_RTOL
    ft, state = _weights(FT), merged.state_dict()
    for name, tensor in ft.items():
        if name.endswith(".bias"):
            assert torch.equal(state[name], tensor), name  # the fine-tuned bias itself
        else:
            assert _rel(state[name], tensor) < OUTPUT_RTOL, name


def test_peft_holds_one_folded_bias_adapter_per_model(adapters):
    out, _ = adapters["fold"]
    adapted = peft.PeftModel.from_pretrained(_load(BASE), out)
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        adapted.load_adapter(out, adapter_name="second")
    control, _ = adapters["lora_bias"]  # lora_bias keeps bias="none": a second adapter loads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: lora_bias on layers without a bias cannot merge
        _adapted(control).load_adapter(control, adapter_name="second")


def test_the_readme_load_and_merge_recipe(tmp_path, fine_tuned):
    compress(FT, tmp_path / "adapter", base=BASE, policy=FULL)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")  # base from adapter_config.json
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert _rel(_logits(_load(tmp_path / "merged")), fine_tuned) < OUTPUT_RTOL


def test_without_its_folded_biases_the_adapter_misses_the_finetune(adapters, fine_tuned, tmp_path):
    # Negative control: the folded biases are what brings the outputs to the fine-tune.
    out, _ = adapters["fold"]
    stripped = tmp_path / "stripped"
    shutil.copytree(out, stripped)
    tensors = load_file(out / "adapter_model.safetensors")
    kept = {k: t for k, t in tensors.items() if not k.endswith("base_layer.bias")}
    save_file(kept, stripped / "adapter_model.safetensors")
    assert _rel(_logits(peft.PeftModel.from_pretrained(_load(BASE), stripped)), fine_tuned) > 100 * OUTPUT_RTOL


def test_bias_modes_apply_the_same_update_before_merging(adapters):
    fold, lora_bias = (_logits(_adapted(adapters[m][0])) for m in ("fold", "lora_bias"))
    assert _rel(fold, lora_bias) < OUTPUT_RTOL
    # PEFT documents the price of fold: the adapter replaces the base biases in place, so
    # disabling it gives the base weights with fine-tuned biases, not the base model.
    base = _logits(_load(BASE))
    folded, with_lora_bias = _adapted(adapters["fold"][0]), _adapted(adapters["lora_bias"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: disabling a bias="lora_only" adapter keeps its biases
        with with_lora_bias.disable_adapter():
            assert _rel(_logits(with_lora_bias), base) < OUTPUT_RTOL
        with folded.disable_adapter():
            assert _rel(_logits(folded), base) > 100 * OUTPUT_RTOL
    name = "model.layers.0.self_attn.q_proj.bias"  # unload() likewise keeps the fine-tuned bias
    assert torch.equal(folded.unload().state_dict()[name], _weights(FT)[name])


def test_leave_out_reports_the_bias_deltas_and_merges_without_them(adapters, fine_tuned):
    out, report = adapters["leave_out"]
    left = report[report["name"].str.endswith("_proj.bias")]
    assert len(left) == 6 and set(left["treatment"]) == {"left_out"} and (left["update_share"] > 0).all()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["bias"] == "none" and config["lora_bias"] is False
    with torch.no_grad():
        merged = peft.PeftModel.from_pretrained(_load(BASE), out).merge_and_unload()
    assert _lora_layers(merged) == []
    name = "model.layers.0.self_attn.q_proj.bias"
    assert torch.equal(merged.state_dict()[name], _weights(BASE)[name])
    assert _rel(_logits(merged), fine_tuned) > 100 * OUTPUT_RTOL  # the bias deltas are missing


def test_fold_with_embedding_lora_keeps_the_embedding_lora_and_merges(tmp_path, fine_tuned):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot combine lora_bias with embedding LoRA"
        report = compress(FT, tmp_path / "e", base=BASE, policy=FULL, method="exact", embeddings="lora")
    assert _treatments(report)["model.embed_tokens.weight"] == "lora_embedding"
    with torch.no_grad():
        merged = peft.PeftModel.from_pretrained(_load(BASE), tmp_path / "e").merge_and_unload()
    assert _rel(_logits(merged), fine_tuned) < OUTPUT_RTOL


def test_an_unchanged_bias_is_not_written_and_the_base_bias_stays(tmp_path):
    # A fine-tune whose layer-1 q_proj bias did not change, as two single-file HF folders.
    name = "model.layers.1.self_attn.q_proj.bias"
    base_weights, ft_weights = _weights(BASE), _weights(FT)
    ft_weights[name] = base_weights[name].clone()
    for folder, tensors in (("base", base_weights), ("ft", ft_weights)):
        (tmp_path / folder).mkdir()
        shutil.copy(BASE / "config.json", tmp_path / folder / "config.json")
        save_file(tensors, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
    report = compress(tmp_path / "ft", tmp_path / "a", base=tmp_path / "base", policy=FULL, method="exact")
    assert name not in set(report["name"]) and _treatments(report)[name.replace("q_proj", "k_proj")] == "folded_bias"
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias" not in set(f.keys())
    adapted = peft.PeftModel.from_pretrained(_load(tmp_path / "base"), tmp_path / "a")
    with torch.no_grad():
        merged = adapted.merge_and_unload()
    assert torch.equal(merged.state_dict()[name], base_weights[name])
    assert _rel(_logits(merged), _logits(_load(tmp_path / "ft"))) < OUTPUT_RTOL


def test_adapter_config_names_the_base_as_given_and_its_task_type(tmp_path, monkeypatch, fine_tuned):
    monkeypatch.chdir(SAMPLES.parent)
    base, ft = "sample_checkpoints/base-sharded/", "sample_checkpoints/finetuned-sharded"
    compress(ft, tmp_path / "a", base=base, policy=FULL)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sample_checkpoints/base-sharded"
    assert config["task_type"] == "CAUSAL_LM"  # from config.json: LlamaForCausalLM
    # AutoPeftModelForCausalLM reads both fields: it loads the base from that path itself.
    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a")
    assert isinstance(adapted, peft.PeftModelForCausalLM)
    assert _rel(_logits(adapted), fine_tuned) < OUTPUT_RTOL


def test_a_file_base_gives_its_path_and_no_task_type_unless_told(tmp_path):
    base, ft = SAMPLES / "base.safetensors", SAMPLES / "finetuned.safetensors"
    compress(ft, tmp_path / "a", base=base)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["task_type"] is None
    compress(ft, tmp_path / "b", base=base, task_type="SEQ_CLS")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    # --task-type also overrides what the base folder's config.json says.
    compress(FT, tmp_path / "c", base=BASE, task_type="FEATURE_EXTRACTION")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"


def test_an_unreadable_config_json_leaves_the_task_type_unset_and_says_so(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    (base / "config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="cannot read the model config"):
        compress(FT, tmp_path / "a", base=base)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] is None


@pytest.mark.parametrize(
    ("config", "task"),
    [
        ({"architectures": ["LlamaForCausalLM"]}, "CAUSAL_LM"),
        ({"architectures": ["GPT2LMHeadModel"]}, "CAUSAL_LM"),
        ({"architectures": ["Qwen2ForSequenceClassification"]}, "SEQ_CLS"),
        ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "SEQ_2_SEQ_LM"),
        ({"architectures": ["BertForTokenClassification"]}, "TOKEN_CLS"),
        ({"architectures": ["BertForQuestionAnswering"]}, "QUESTION_ANS"),
        # Not guessed: decoder-only "ForConditionalGeneration", masked LMs, bare models, mixtures.
        ({"architectures": ["LlavaForConditionalGeneration"]}, None),
        ({"architectures": ["BertForMaskedLM"]}, None),
        ({"architectures": ["BertModel"]}, None),
        ({"architectures": ["LlamaForCausalLM", "LlamaForSequenceClassification"]}, None),
        ({"architectures": None}, None),
        ({}, None),
    ],
)
def test_task_type_of_architectures(config, task):
    assert peft_format.task_type_of(config) == task


def test_task_types_are_peft_task_types():
    assert set(peft_format.TASK_TYPES) == {t.value for t in peft.TaskType}
    assert len(set(peft_format.TASK_TYPES)) == len(peft_format.TASK_TYPES)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"task_type": "causal_lm"}, "task type must be one of PEFT's SEQ_CLS, .* but got 'causal_lm'"),
        ({"bias": "lora_only"}, "bias must be one of fold, lora_bias, leave_out but got 'lora_only'"),
    ],
)
def test_invalid_bias_or_task_type_is_an_option_error(tmp_path, options, message):
    with pytest.raises(OptionError, match=message):
        compress(FT, tmp_path / "a", base=BASE, **options)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("options", [{"bias": "lora_bias"}, {"task_type": "CAUSAL_LM"}])
def test_adapter_options_without_base_are_refused(tmp_path, options):
    with pytest.raises(OptionError, match="apply to adapters: give --base"):
        compress(FT, tmp_path / "a", **options)


def test_cli_bias_and_task_type(tmp_path):
    args = ["compress", str(FT), "--base", str(BASE), "--energy", "1", "--method", "exact", "-q"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "a"), "--bias", "lora_bias", "--task-type", "SEQ_CLS"])
    assert result.exit_code == 0, result.output
    assert "Warning: bias deltas go into lora_bias" in result.output
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["task_type"] == "SEQ_CLS"
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output  # fold, the default, merges cleanly: nothing to warn about
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["bias"] == "lora_only"
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "c"), "--task-type", "causal"])
    assert result.exit_code == 2 and "Error: task type must be one of PEFT's" in result.output
    assert not (tmp_path / "c").exists()


def test_cli_help_lists_every_bias_mode_and_task_type():
    result = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for value in (*peft_format.BIAS_MODES, *peft_format.TASK_TYPES):
        assert value in result.output, value
    assert f"[default: {peft_format.DEFAULT_BIAS}]" in result.output
