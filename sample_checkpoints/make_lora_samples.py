"""Make the LoRA adapter samples in ``lora/``: trained adapters with known factor balance,
a kohya-style file, and synthetic adapters of known rank and balance.

Run from anywhere (about 25 s on one CPU core)::

    python sample_checkpoints/make_lora_samples.py            # writes sample_checkpoints/lora/
    python sample_checkpoints/make_lora_samples.py --out DIR  # or into DIR

It reads ``base.safetensors`` and ``finetuned.safetensors`` beside it (made by
``make_samples.py``) and writes:

- ``gd/``: a PEFT LoRA adapter (r 8, lora_alpha 16, the seven projections of both layers)
  trained by plain gradient descent to make the base imitate the full fine-tune: the mean
  squared error between the adapted model's logits and the fine-tune's, on one fixed batch
  of uniform random tokens (full-batch gradient descent). The factors start balanced
  (A = eps Q1^T, B = eps Q2, so B^T B = A A^T = eps^2 I). Gradient flow on L(W + s B A)
  conserves B^T B - A A^T exactly; a step of size lr changes it by exactly
  lr^2 (gB^T gB - gA gA^T), so it drifts by O(lr^2) per step. ``gd/training.json`` records
  the losses and, per module, the balance at start and end, the drift, and the sum of
  those second-order terms (which the drift equals up to float32 rounding).
- ``adam/``: the same start, objective and number of steps with AdamW (weight decay 0.1):
  Adam's per-coordinate scaling and the decay do not conserve the balance.
- ``kohya.safetensors``: ``gd/``'s update in kohya's layout (``lora_down`` = A,
  ``lora_up`` = B, ``alpha`` = 16), plus one synthetic conv module ``lora_conv_test``.
- ``rank4in16/``: a PEFT adapter, r 16, lora_alpha 32, whose B @ A has rank exactly 4 in
  every module (B's 16 columns are signed powers of two times 4 random columns, so the
  stored float32 B has rank exactly 4), with ||B||_F = ||A||_F.
- ``unbalanced/``: the same construction with r 8, lora_alpha 16, then B * 100 and A / 100.

Seeded, one thread, deterministic algorithms: reruns on one machine write the same bytes
(PEFT writes ``target_modules`` in set order, which depends on PYTHONHASHSEED, so the
config is rewritten with the list sorted). Across CPU vector units the trained tensors
differ in the last bits, as for ``make_samples.py``. ``README.md`` beside this file gives
the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tiny_llama import TinyLlamaConfig, TinyLlamaForCausalLM  # noqa: E402

SEED = 20261123 + 30  # make_samples.py uses SEED + 0, 1, 10, 20
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16
EPS = 0.05  # balanced start: A = EPS * Q1^T, B = EPS * Q2, so ||A||_F = ||B||_F = EPS * sqrt(RANK)
STEPS = 400
BATCH, SEQ_LEN = 32, 32  # the fixed training batch: 32 sequences of 32 uniform random tokens
SGD_LR = 0.3
ADAM_LR = 1e-3
ADAM_WEIGHT_DECAY = 0.1
LOG_EVERY = 50
# The synthetic adapters: product of rank exactly 4, ||scale * B @ A||_F = SYNTHETIC_SIZE * ||W||_F.
SYNTHETIC_RANK = 4
SYNTHETIC_SIZE = 0.1
UNBALANCE = 100.0
PEFT_PREFIX = "base_model.model."


def tiny_model(weights: dict[str, torch.Tensor]) -> TinyLlamaForCausalLM:
    model = TinyLlamaForCausalLM(TinyLlamaConfig())
    model.load_state_dict(weights)
    return model.eval()


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers by module path (``model.layers.0.self_attn.q_proj``)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            found[name.removeprefix(PEFT_PREFIX)] = module
    return dict(sorted(found.items()))


def factors(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the default adapter: A is r x in, B is out x r."""
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def balance(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The factor-balance figures of raw factors (not scaled by alpha / r), in float64."""
    a, b = a.detach().double(), b.detach().double()
    na, nb = torch.linalg.matrix_norm(a).item(), torch.linalg.matrix_norm(b).item()
    gap = torch.linalg.matrix_norm(b.T @ b - a @ a.T).item()
    return {
        "norm_A": na,
        "norm_B": nb,
        "norm_ratio_B_over_A": nb / na,
        "imbalance_abs": gap,  # ||B^T B - A A^T||_F
        "imbalance_rel": gap / (na * nb),  # the same over ||B||_F ||A||_F
    }


def gram_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.detach().double(), b.detach().double()
    return b.T @ b - a @ a.T


def sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def rounded(tree: object) -> object:
    if isinstance(tree, dict):
        return {k: rounded(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [rounded(v) for v in tree]
    return sig(tree) if isinstance(tree, float) else tree


def balanced_start(model: peft.PeftModel, gen: torch.Generator) -> None:
    """A = EPS * Q1^T, B = EPS * Q2 with orthonormal Q1 (in x r), Q2 (out x r) from a float64 QR."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            a, b = factors(layer)
            q1, _ = torch.linalg.qr(torch.randn(a.shape[1], RANK, generator=gen, dtype=torch.float64))
            q2, _ = torch.linalg.qr(torch.randn(b.shape[0], RANK, generator=gen, dtype=torch.float64))
            a.copy_(EPS * q1.T)
            b.copy_(EPS * q2)


def train_adapter(kind: str, base: dict[str, torch.Tensor], ids: torch.Tensor, held_out: torch.Tensor, targets):
    """Train one adapter from the balanced start; return the PEFT model and the training record."""
    target, held_out_target = targets
    torch.manual_seed(SEED)  # PEFT's own initialization, overwritten below
    model = tiny_model(base)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    # PeftModel rather than get_peft_model: PeftModelForCausalLM wants a transformers model
    # (prepare_inputs_for_generation); the LoRA layers and the saved files are the same.
    adapted = peft.PeftModel(model, config)
    balanced_start(adapted, torch.Generator().manual_seed(SEED + 1))  # the same start for both optimizers
    layers = lora_layers(adapted)
    params = [p for p in adapted.parameters() if p.requires_grad]
    if kind == "gd":
        opt = torch.optim.SGD(params, lr=SGD_LR, momentum=0.0, weight_decay=0.0)
        described = f"SGD, lr={SGD_LR}, momentum 0, weight_decay 0"
    else:
        opt = torch.optim.AdamW(params, lr=ADAM_LR, weight_decay=ADAM_WEIGHT_DECAY)
        described = f"AdamW, lr={ADAM_LR}, betas (0.9, 0.999), eps 1e-8, weight_decay {ADAM_WEIGHT_DECAY}"

    def held_out_loss() -> float:
        with torch.no_grad():
            return F.mse_loss(model(held_out), held_out_target).item()

    start = {name: balance(*factors(layer)) for name, layer in layers.items()}
    gap0 = {name: gram_gap(*factors(layer)) for name, layer in layers.items()}
    second_order = {name: torch.zeros_like(g) for name, g in gap0.items()}
    held_out_start = held_out_loss()
    curve = []
    for step in range(STEPS + 1):
        loss = F.mse_loss(model(ids), target)
        if step == 0:
            loss_start = loss.item()
        if step % LOG_EVERY == 0:
            curve.append([step, loss.item()])
        if step == STEPS:
            loss_end = loss.item()
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if kind == "gd":  # the exact change of B^T B - A A^T in this step: lr^2 (gB^T gB - gA gA^T)
            for name, layer in layers.items():
                a, b = factors(layer)
                ga, gb = a.grad.double(), b.grad.double()
                second_order[name] += SGD_LR**2 * (gb.T @ gb - ga @ ga.T)
        opt.step()

    modules = {}
    for name, layer in layers.items():
        end = balance(*factors(layer))
        drift = torch.linalg.matrix_norm(gram_gap(*factors(layer)) - gap0[name]).item()
        record = {"start": start[name], "end": end, "drift_abs": drift}
        record["drift_rel"] = drift / (end["norm_A"] * end["norm_B"])
        if kind == "gd":
            predicted = torch.linalg.matrix_norm(second_order[name]).item()
            record["second_order_sum_abs"] = predicted
        modules[name] = record
    summary = {
        "max_drift_rel": max(m["drift_rel"] for m in modules.values()),
        "max_drift_abs": max(m["drift_abs"] for m in modules.values()),
        "max_imbalance_rel_start": max(m["start"]["imbalance_rel"] for m in modules.values()),
        "max_imbalance_rel_end": max(m["end"]["imbalance_rel"] for m in modules.values()),
        "norm_ratio_B_over_A_end_range": [
            min(m["end"]["norm_ratio_B_over_A"] for m in modules.values()),
            max(m["end"]["norm_ratio_B_over_A"] for m in modules.values()),
        ],
    }
    with torch.no_grad():
        no_adapter = adapted.disable_adapter()
        with no_adapter:
            loss_base = F.mse_loss(model(ids), target).item()
    record = {
        "optimizer": described,
        "steps": STEPS,
        "r": RANK,
        "lora_alpha": ALPHA,
        "scale": ALPHA / RANK,
        "init": (
            f"balanced: A = eps * Q1^T, B = eps * Q2, eps = {EPS}, Q1 (in x r) and Q2 (out x r) orthonormal "
            "columns from a float64 QR of seeded Gaussians, cast to float32"
        ),
        "objective": (
            "mean squared error between the logits of base + LoRA and those of finetuned.safetensors, "
            f"full batch: one fixed batch of {BATCH} sequences of {SEQ_LEN} uniform random tokens, every step"
        ),
        "loss": {
            "base_without_adapter": loss_base,
            "start": loss_start,
            "end": loss_end,
            "relative_drop": 1 - loss_end / loss_start,
        },
        "held_out_loss": {"start": held_out_start, "end": held_out_loss()},
        "loss_curve": curve,
        "balance_figures": (
            "raw factors as stored (not scaled by alpha / r), float64: norm_A = ||A||_F, norm_B = ||B||_F, "
            "imbalance_abs = ||B^T B - A A^T||_F, imbalance_rel = imbalance_abs / (||B||_F ||A||_F); "
            "drift_abs = ||(B^T B - A A^T)_end - (B^T B - A A^T)_start||_F, drift_rel = drift_abs / "
            "(||B_end||_F ||A_end||_F)"
            + (
                "; second_order_sum_abs = ||sum over steps of lr^2 (gB^T gB - gA gA^T)||_F, what plain gradient "
                "descent changes B^T B - A A^T by in exact arithmetic"
                if kind == "gd"
                else ""
            )
        ),
        "summary": summary,
        "modules": modules,
    }
    return adapted, rounded(record)


def save_peft(adapted: peft.PeftModel, folder: Path) -> dict:
    adapted.save_pretrained(folder)
    (folder / "README.md").unlink()  # PEFT's Hub model card: boilerplate, not part of the adapter
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    # PEFT writes target_modules in set order (hash-seeded): sort it so reruns write the same bytes.
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def kohya_name(module: str) -> str:
    return "lora_" + module.replace(".", "_")


def kohya_tensors(adapter: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The PEFT adapter in kohya's layout, plus a synthetic conv module."""
    out = {}
    for key, tensor in adapter.items():
        module, _, rest = key.removeprefix(PEFT_PREFIX).partition(".lora_")
        part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[rest]
        out[f"{kohya_name(module)}.{part}"] = tensor.clone().contiguous()
        out[f"{kohya_name(module)}.alpha"] = torch.tensor(float(ALPHA), dtype=torch.float32)
    # A conv LoRA: down (r 4, in 8, 3, 3), up (out 16, r 4, 1, 1), alpha 4 (scale 1);
    # delta W (16, 8, 3, 3) = (alpha / r) * (up.view(16, 4) @ down.view(4, 72)).view(16, 8, 3, 3).
    out["lora_conv_test.lora_down.weight"] = torch.randn(4, 8, 3, 3, generator=gen) / math.sqrt(72)
    out["lora_conv_test.lora_up.weight"] = torch.randn(16, 4, 1, 1, generator=gen) / 2
    out["lora_conv_test.alpha"] = torch.tensor(4.0, dtype=torch.float32)
    return out


def rank4_factors(
    out_features: int, in_features: int, r: int, size: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), float32, with B @ A of rank exactly SYNTHETIC_RANK and ||B||_F = ||A||_F.

    B's r columns are signed powers of two times SYNTHETIC_RANK random columns (each used at
    least once, in a random order): scaling by a power of two is exact in floating point, and
    so is scaling all of B by one number afterwards, so the stored B has rank exactly 4.
    A is a full-rank Gaussian. ``size`` is ||(alpha / r) B @ A||_F, with alpha = 2 r.
    """
    k = SYNTHETIC_RANK
    basis = torch.randn(out_features, k, generator=gen)
    columns = torch.cat([torch.arange(k), torch.randint(0, k, (r - k,), generator=gen)])
    columns = columns[torch.randperm(r, generator=gen)]
    signs = torch.randint(0, 2, (r,), generator=gen) * 2 - 1
    powers = torch.randint(-2, 3, (r,), generator=gen)
    b = basis[:, columns] * (signs * torch.pow(2.0, powers))
    a = torch.randn(r, in_features, generator=gen)
    product = 2.0 * (b.double() @ a.double())  # scale alpha / r = 2
    grow = size / torch.linalg.matrix_norm(product).item()
    even = math.sqrt(torch.linalg.matrix_norm(a.double()).item() / torch.linalg.matrix_norm(b.double()).item())
    return a * (math.sqrt(grow) / even), b * (math.sqrt(grow) * even)


def synthetic_adapter(
    base: dict[str, torch.Tensor], modules: list[str], r: int, gen: torch.Generator, unbalance: float = 1.0
) -> dict[str, torch.Tensor]:
    tensors = {}
    for module in modules:
        w = base[f"{module}.weight"]
        size = SYNTHETIC_SIZE * torch.linalg.matrix_norm(w.double()).item()
        a, b = rank4_factors(w.shape[0], w.shape[1], r, size, gen)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (a / unbalance).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (b * unbalance).contiguous()
    return tensors


def write_synthetic(folder: Path, tensors: dict[str, torch.Tensor], config: dict, r: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {**config, "r": r, "lora_alpha": 2 * r}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def synthetic_figures(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per module: the balance figures and the singular values of B @ A relative to the first."""
    out = {}
    for key in sorted(tensors):
        if key.endswith("lora_A.weight"):
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
            s = torch.linalg.svdvals(b.double() @ a.double())
            out[module] = {
                **balance(a, b),
                "rank_of_B": int(torch.linalg.matrix_rank(b.double()).item()),
                "s5_over_s1": (s[SYNTHETIC_RANK] / s[0]).item(),
            }
    return out


def check_loads(folder: Path, base: dict[str, torch.Tensor], ids: torch.Tensor) -> tuple[float, float]:
    """Load ``folder`` with ``peft.PeftModel.from_pretrained`` on the base twice: as transformers'
    ``LlamaForCausalLM`` from ``base-sharded/`` (which task_type CAUSAL_LM needs), and as
    ``TinyLlamaForCausalLM`` with the config's task_type set to None (PeftModelForCausalLM wants
    ``prepare_inputs_for_generation``, which it lacks). Check that no LoRA key is missing or
    unexpected and that PEFT's merge is base + (alpha / r) B @ A. Return the largest relative
    difference of a merged matrix and the relative difference of the two models' logits."""
    import transformers

    transformers.logging.set_verbosity_error()  # the o_proj bias it adds (zeros) is "missing"
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(HERE / "base-sharded").eval()
    adapted = peft.PeftModel.from_pretrained(model, folder)
    keys = adapted.load_adapter(folder, adapter_name="check")
    lora_missing = [k for k in keys.missing_keys if "lora_" in k]
    if lora_missing or keys.unexpected_keys:
        raise RuntimeError(f"{folder}: missing {lora_missing}, unexpected {keys.unexpected_keys}")
    adapted.delete_adapter("check")
    config = peft.PeftConfig.from_pretrained(folder)
    config.task_type = None
    tiny = peft.PeftModel.from_pretrained(tiny_model(base), folder, config=config)
    with torch.no_grad():
        hf_logits, tiny_logits = adapted(input_ids=ids).logits, tiny(ids)
    logits = (torch.linalg.vector_norm(hf_logits - tiny_logits) / torch.linalg.vector_norm(tiny_logits)).item()
    if logits > 1e-5:
        raise RuntimeError(f"{folder}: the two loaded models differ by {logits:.1e}")
    scale = config.lora_alpha / config.r
    tensors = load_file(folder / "adapter_model.safetensors")
    merged = adapted.merge_and_unload().state_dict()
    worst = 0.0
    for key in tensors:
        if key.endswith("lora_A.weight"):
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            by_hand = base[f"{module}.weight"] + scale * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
            got = merged[f"{module}.weight"]
            worst = max(worst, (torch.linalg.matrix_norm(got - by_hand) / torch.linalg.matrix_norm(by_hand)).item())
    if worst > 1e-6:
        raise RuntimeError(f"{folder}: PEFT's merge differs from base + scale B @ A by {worst:.1e}")
    return worst, logits


def check_kohya(path: Path, peft_tensors: dict[str, torch.Tensor]) -> int:
    """(alpha / r) up @ down of every module of the kohya file equals PEFT's scale B @ A, bit for bit."""
    kohya = load_file(path)
    count = 0
    for key in peft_tensors:
        if key.endswith("lora_A.weight"):
            name = kohya_name(key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight"))
            down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
            ours = (kohya[f"{name}.alpha"].item() / down.shape[0]) * up @ down
            theirs = (ALPHA / RANK) * peft_tensors[key.replace("lora_A", "lora_B")] @ peft_tensors[key]
            if not torch.equal(ours, theirs):
                raise RuntimeError(f"{path}: {name} differs from the PEFT adapter")
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "lora")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    base = load_file(HERE / "base.safetensors")
    finetuned = tiny_model(load_file(HERE / "finetuned.safetensors"))
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, TinyLlamaConfig().vocab_size, (BATCH, SEQ_LEN), generator=gen)
    held_out = torch.randint(0, TinyLlamaConfig().vocab_size, (BATCH, SEQ_LEN), generator=gen)
    with torch.no_grad():
        targets = (finetuned(ids), finetuned(held_out))

    lines = []
    trained = {}
    for kind in ("gd", "adam"):
        adapted, record = train_adapter(kind, base, ids, held_out, targets)
        folder = out / kind
        config = save_peft(adapted, folder)
        (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        trained[kind] = (config, load_file(folder / "adapter_model.safetensors"))
        loss, summary = record["loss"], record["summary"]
        lines.append(
            f"{kind}: {record['optimizer']}, {STEPS} steps; loss {loss['start']:.4g} -> {loss['end']:.4g} "
            f"(-{100 * loss['relative_drop']:.0f} %); max drift of B^T B - A A^T {summary['max_drift_rel']:.2e} "
            f"of ||B|| ||A|| ({summary['max_drift_abs']:.2e} absolute)"
        )

    gd_config, gd_tensors = trained["gd"]
    save_file(kohya_tensors(gd_tensors, torch.Generator().manual_seed(SEED + 2)), out / "kohya.safetensors")
    count = check_kohya(out / "kohya.safetensors", gd_tensors)
    lines.append(f"kohya.safetensors: {count} modules, (alpha / r) up @ down = gd/'s scale B @ A bit for bit; + conv")

    modules = sorted({k.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") for k in gd_tensors if "lora_A" in k})
    for label, r, unbalance, seed in (("rank4in16", 16, 1.0, SEED + 3), ("unbalanced", 8, UNBALANCE, SEED + 4)):
        tensors = synthetic_adapter(base, modules, r, torch.Generator().manual_seed(seed), unbalance)
        write_synthetic(out / label, tensors, gd_config, r)
        figures = synthetic_figures(tensors)
        if any(f["rank_of_B"] != SYNTHETIC_RANK or f["s5_over_s1"] > 1e-12 for f in figures.values()):
            raise RuntimeError(f"{label}: a product is not of rank {SYNTHETIC_RANK}")
        ratios = [f["norm_ratio_B_over_A"] for f in figures.values()]
        lines.append(
            f"{label}: r {r}, rank of B @ A 4 (largest s5/s1 {max(f['s5_over_s1'] for f in figures.values()):.1e}), "
            f"||B||/||A|| {min(ratios):.4g} to {max(ratios):.4g}"
        )

    for label in ("gd", "adam", "rank4in16", "unbalanced"):
        worst, logits = check_loads(out / label, base, held_out[:4])
        lines.append(
            f"{label}/ loads with PEFT (LlamaForCausalLM and TinyLlamaForCausalLM, logits within {logits:.1e}); "
            f"merge = base + scale B @ A to {worst:.1e}"
        )
    print("\n".join(lines))
    print(f"wrote {out} in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
