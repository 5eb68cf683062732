"""Which tensors are matrices, how they are viewed, and base pairing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lowrank_audit.errors import NoMatricesSelected, ShapeMismatchError
from lowrank_audit.io.checkpoint import open_checkpoint
from lowrank_audit.io.selection import matrix_view, parse_name, read_matrices, select_matrices


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.3.self_attn.q_proj.weight", ("model.layers.3.self_attn.q_proj", "q_proj", 3)),
        ("model.embed_tokens.weight", ("model.embed_tokens", "embed_tokens", None)),
        ("lm_head.weight", ("lm_head", "lm_head", None)),
        ("model.layers.7.mlp.experts.12.w1.weight", ("model.layers.7.mlp.experts.12.w1", "w1", 7)),
        ("transformer.h.0.attn.c_attn.weight", ("transformer.h.0.attn.c_attn", "c_attn", 0)),
        ("blk.2.ffn_up", ("blk.2.ffn_up", "ffn_up", 2)),
        ("weight", ("weight", "weight", None)),
    ],
)
def test_parse_name(name, expected):
    assert parse_name(name) == expected


def test_matrix_views():
    assert matrix_view((96, 64)) == (1, 96, 64)
    assert matrix_view((4, 32, 24)) == (4, 32, 24)  # stacked experts
    assert matrix_view((16, 8, 3, 3)) == (1, 16, 72)  # conv kernel
    assert matrix_view((2, 3, 4, 5, 6)) == (1, 2, 360)


def test_synthetic_selection_and_skip_reasons(samples):
    with open_checkpoint(samples / "synthetic.safetensors") as ckpt:
        sel = select_matrices(ckpt)
    assert [(s.name, s.count, s.rows, s.cols) for s in sel.specs] == [
        ("conv.weight", 1, 16, 72),
        ("exact_rank4.weight", 1, 96, 64),
        ("experts.weight", 4, 32, 24),
        ("noisy_rank4.weight", 1, 96, 64),
        ("row.weight", 1, 1, 64),  # one singular value: its norm
    ]
    assert sel.skipped == {
        "norm.weight": "1-D",
        "token_ids": "not floating point (int64)",
    }
    assert all(s.kind == "weight" for s in sel.specs)


def test_include_exclude_globs(samples):
    with open_checkpoint(samples / "base.safetensors") as ckpt:
        attn = select_matrices(ckpt, include=["*self_attn*"])
        assert {s.role for s in attn.specs} == {"q_proj", "k_proj", "v_proj", "o_proj"} and len(attn.specs) == 8
        no_attn = select_matrices(ckpt, exclude=["*self_attn*", "lm_head*"])
        assert {s.role for s in no_attn.specs} == {"gate_proj", "up_proj", "down_proj", "embed_tokens"}
        with pytest.raises(NoMatricesSelected, match="no matrix to audit with these --include/--exclude patterns"):
            select_matrices(ckpt, include=["*nothing*"])


def test_pairing_with_base(samples, tmp_path):
    with (
        open_checkpoint(samples / "finetuned.safetensors") as ft,
        open_checkpoint(samples / "base.safetensors") as base,
    ):
        sel = select_matrices(ft, base=base)
        assert len(sel.specs) == 16 and all(s.kind == "delta" for s in sel.specs) and not sel.unpaired
        spec = next(s for s in sel.specs if s.name == "lm_head.weight")
        delta = torch.empty(1, 96, 64, dtype=torch.float64)
        (floor,) = read_matrices(spec, ft, base, delta)
        assert torch.equal(delta[0], ft["lm_head.weight"].double() - base["lm_head.weight"].double())
        assert floor > 0  # float32 samples: a small floor, tested in tests/test_floor.py


def test_missing_names_are_reported_and_shapes_must_match(samples, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(samples / "base.safetensors")
    extra = dict(tensors, **{"extra.weight": torch.ones(4, 4)})
    del extra["lm_head.weight"]
    save_file(extra, tmp_path / "other.safetensors")
    with (
        open_checkpoint(samples / "finetuned.safetensors") as ft,
        open_checkpoint(tmp_path / "other.safetensors") as base,
    ):
        sel = select_matrices(ft, base=base)
        assert sel.unpaired == {"extra.weight": "only in base", "lm_head.weight": "only in fine-tune"}
        assert "lm_head.weight" not in {s.name for s in sel.specs} and len(sel.specs) == 15
    bad = dict(tensors, **{"lm_head.weight": torch.zeros(64, 96)})
    save_file(bad, tmp_path / "bad.safetensors")
    want = r"'lm_head.weight' has shape \[96, 64\] in .*finetuned.safetensors but \[64, 96\] in base .*bad.safetensors"
    with (
        open_checkpoint(samples / "finetuned.safetensors") as ft,
        open_checkpoint(tmp_path / "bad.safetensors") as base,
        pytest.raises(ShapeMismatchError, match=want),
    ):
        select_matrices(ft, base=base)
