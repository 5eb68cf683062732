"""The commands under torchrun: two CPU processes (gloo) give what one process gives.

Each launch is ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
lowrank_audit ...`` (about 6 s on two cores); the single-process reference runs in this
process. Reports must hold the same rows in the same order, with values within float
tolerance (the two processes decompose other batches, single-threaded, than one process
does); moments within float64 rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from lowrank_audit.analyses.capture import capture
from lowrank_audit.analyses.spectrum import spectrum
from lowrank_audit.distributed import World, block, split
from lowrank_audit.engine.config import EngineConfig
from lowrank_audit.io.activations import read_activations
from lowrank_audit.io.checkpoint import open_checkpoint
from lowrank_audit.io.model_inputs import load_model, open_batches
from lowrank_audit.io.selection import select_matrices
from tests.conftest import SAMPLES
from tests.corpus import _flip, _local_data_offset, _member
from tests.test_capture import HELPER, HELPER_SOURCE, _block_batches
from tests.test_cli import invoke

FT, BASE = SAMPLES / "finetuned.safetensors", SAMPLES / "base.safetensors"
ACTS = SAMPLES / "dropout" / "activations-dropout.safetensors"
# Float32 spectra of the same matrix, batched differently and single-threaded: |Δσ| <= this · σ₁
# (measured 0 on this machine; backward stability allows tens of float32 eps).
SV_RTOL = 5e-6


def torchrun(*args: object, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(cwd), os.getcwd()])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lowrank_audit", *map(str, args)]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(result: Any) -> Any:
    """A torchrun launch (returncode) or an in-process CLI run (exit_code) that succeeded."""
    code = getattr(result, "returncode", getattr(result, "exit_code", None))
    assert code == 0, result.stdout + result.stderr
    return result


def assert_same_report(two: pd.DataFrame, one: pd.DataFrame, lists: tuple[str, ...] = ("singular_values",)) -> None:
    """Same rows in the same order, equal identities and ranks, float values within SV_RTOL of their scale."""
    assert list(two.columns) == list(one.columns)
    assert len(two) == len(one) and len(one) > 0
    for column in one.columns:
        a, b = two[column], one[column]
        if column in lists:
            for x, y in zip(a, b, strict=True):
                assert (x is None) == (y is None), column
                if x is not None:
                    x, y = np.asarray(x, float), np.asarray(y, float)
                    scale = max(np.nanmax(np.abs(y)), 1e-300) if y.size else 1.0
                    assert x.shape == y.shape and np.allclose(x, y, rtol=0, atol=SV_RTOL * scale, equal_nan=True)
        elif column == "condition_number":  # σ₁/σ_min: compare σ_min/σ₁, which is within SV_RTOL as σ_min is
            assert np.allclose(1 / a.to_numpy(float), 1 / b.to_numpy(float), rtol=0, atol=SV_RTOL), column
        elif pd.api.types.is_float_dtype(b):
            x, y = a.to_numpy(float, na_value=np.nan), b.to_numpy(float, na_value=np.nan)
            assert np.allclose(x, y, rtol=SV_RTOL, atol=1e-12, equal_nan=True), column
        else:
            assert [_plain(x) for x in a] == [_plain(y) for y in b], column


def _plain(value: Any) -> Any:
    """A cell as plain Python for comparison: lists for arrays, None for nulls."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return None if pd.isna(value) else value


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The in-process reference with one thread, as each torchrun process has: float32 products
    then round alike (GEMM blocking depends on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def metadata(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"lowrank_audit"])


# ------------------------------------------------------------------------------------- the plan


def test_split_is_cost_balanced_deterministic_and_complete():
    costs = [9, 1, 8, 2, 7, 3, 6, 4, 5, 5]
    parts = split(list(range(len(costs))), lambda i: costs[i], 3)
    assert parts == split(list(range(len(costs))), lambda i: costs[i], 3)
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    assert all(p == sorted(p) for p in parts)  # each part keeps the given order
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs)  # largest first: no part is a whole item behind
    assert loads == [17, 17, 16]
    # Negative control: a split by position alone (round robin) is unbalanced on the same costs.
    robin = [sum(costs[i] for i in range(r, len(costs), 3)) for r in range(3)]
    assert max(robin) - min(robin) > max(loads) - min(loads)


def test_large_shapes_spread_first_over_a_model():
    with open_checkpoint(FT) as ckpt:
        specs = select_matrices(ckpt).specs
    config = EngineConfig.create(device="cpu")
    parts = split(specs, config.cost, 2)
    loads = [sum(config.cost(s) for s in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= max(config.cost(s) for s in specs)
    assert sorted(s.name for p in parts for s in p) == sorted(s.name for s in specs)
    # Exact cost m·n·min(m, n); truncated m·n·k with k the first sketch or the cap.
    spec = next(s for s in specs if (s.rows, s.cols) == (64, 128))
    assert config.cost(spec) == 64 * 128 * 64
    assert EngineConfig.create(device="cpu", method="randomized", rank_cap=8).cost(spec) == 64 * 128 * 8


def test_blocks_of_batches_are_contiguous_and_cover_all():
    for count in (0, 1, 5, 6, 7):
        blocks = [block(count, World(rank, 3)) for rank in range(3)]
        assert [i for b in blocks for i in b] == list(range(count))


def test_alone_nothing_is_exchanged():
    world = World()
    assert world.gather(lambda: 3) == [3] and world.run(lambda: 4) == 4 and world.on_main(lambda: 5) == 5
    assert world.share([1, 2, 3], float) == [1, 2, 3]
    with pytest.raises(ZeroDivisionError):  # alone, an error is itself, not a message
        world.gather(lambda: 1 / 0)


# ----------------------------------------------------------------------------- the launch itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_group_that_never_forms_times_out_with_one_line(tmp_path):
    """Rank 0 of 2 with no rank 1: joining gives up after --dist-timeout with a clear line."""
    env = os.environ | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}  # fmt: skip
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lowrank_audit", "spectrum", str(FT), "--out", "r.parquet",
                             "--dist-timeout", "3", "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert time.monotonic() - started < 60
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: process 0 of 2 could not join the process group at 127.0.0.1:")
    assert "--dist-timeout 3 s" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "r.parquet").exists()


def test_a_process_other_than_rank_0_says_what_rank_0_cannot_know(tmp_path):
    """Rank 1 failing to join: rank 0 never hears of it, so rank 1 prints its own line."""
    env = os.environ | {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}  # fmt: skip
    command = [sys.executable, "-m", "lowrank_audit", "spectrum", str(FT), "--dist-timeout", "2", "--device", "cpu"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: process 1 of 2 could not join the process group")
    # Negative control: an error every process meets alike is left to rank 0.
    bad = subprocess.run([*command[:-4], "--dist-timeout", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr == ""


def test_commands_that_do_not_shard_refuse_a_launcher(tmp_path):
    env = os.environ | {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    command = [sys.executable, "-m", "lowrank_audit", "expand", str(FT), "--out", str(tmp_path / "x.safetensors")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "Error: expand runs in one process; start it without torchrun or another launcher"


# ----------------------------------------------------------------- two processes equal one


def test_spectrum_with_alignment_under_two_processes_equals_one(tmp_path):
    args = (FT, "--base", BASE, "--alignment", "--device", "cpu")
    ok(torchrun("spectrum", *args, "--out", "two.parquet", "-q", cwd=tmp_path))
    ok(invoke("spectrum", *args, "--out", tmp_path / "one.parquet", "-q"))
    two, one = pd.read_parquet(tmp_path / "two.parquet"), pd.read_parquet(tmp_path / "one.parquet")
    assert_same_report(two, one)
    meta, single = metadata(tmp_path / "two.parquet"), metadata(tmp_path / "one.parquet")
    assert (meta["world_size"], meta["backend"]) == (2, "gloo")
    assert (single["world_size"], single["backend"]) == (1, None)
    assert meta["inputs"] == single["inputs"]  # every file hashed once, by one of the processes
    assert all(f["sha256"] for side in meta["inputs"].values() for f in side["files"])


def test_recommend_randomized_under_two_processes_equals_one(tmp_path):
    args = (FT, "--base", BASE, "--method", "randomized", "--energy", "0.9", "--device", "cpu", "--json")
    two = ok(torchrun("recommend", *args, "--out", "two.parquet", "--peft-config", "two.json", cwd=tmp_path))
    with one_thread():
        one = ok(invoke("recommend", *args, "--out", tmp_path / "one.parquet", "--peft-config", tmp_path / "one.json"))
    assert json.loads(two.stdout)["rows"] == json.loads(one.stdout)["rows"]  # rank 0 alone prints
    assert (tmp_path / "two.json").read_text() == (tmp_path / "one.json").read_text()
    a, b = pd.read_parquet(tmp_path / "two.parquet"), pd.read_parquet(tmp_path / "one.parquet")
    assert a["rank"].tolist() == b["rank"].tolist() and a["name"].tolist() == b["name"].tolist()


def test_activations_under_two_processes_equal_one(tmp_path):
    ok(torchrun("activations", ACTS, "--device", "cpu", "--out", "two.parquet", "-q", cwd=tmp_path))
    ok(invoke("activations", ACTS, "--device", "cpu", "--out", tmp_path / "one.parquet", "-q"))
    assert_same_report(pd.read_parquet(tmp_path / "two.parquet"), pd.read_parquet(tmp_path / "one.parquet"))
    assert metadata(tmp_path / "two.parquet")["world_size"] == 2


def test_compress_with_a_budget_under_two_processes_equals_one(tmp_path):
    """A budget needs every process's spectra before any factors: both exchanges run."""
    args = (FT, "--base", BASE, "--avg-rank", "4", "--device", "cpu", "-q")
    ok(torchrun("compress", *args, "--out", "two", cwd=tmp_path))
    ok(invoke("compress", *args, "--out", tmp_path / "one"))
    two, one = tmp_path / "two", tmp_path / "one"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (two / "adapter_config.json").read_text() == (one / "adapter_config.json").read_text()
    a, b = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if "lora_A" in name:  # the update B A, which a sign flip of a factor pair leaves unchanged
            b_name = name.replace("lora_A", "lora_B")
            got, want = a[b_name].double() @ a[name].double(), b[b_name].double() @ b[name].double()
            assert float((got - want).abs().max()) <= SV_RTOL * float(want.abs().max()), name
        elif "lora_B" not in name:
            assert torch.equal(a[name], b[name]), name
    report = "compress-report.parquet"
    assert_same_report(pd.read_parquet(two / report), pd.read_parquet(one / report))
    assert metadata(two / report)["world_size"] == 2


def test_calibrated_factorized_compress_under_two_processes_equals_one(tmp_path):
    """No base, with calibration moments: off rank 0 a process factors only its share's XᵀX."""
    moments = sorted((SAMPLES / "calibration").glob("moments-*.safetensors"))
    args = (FT, "--rank", "4", *(a for m in moments for a in ("--calibration", m)), "--device", "cpu", "-q")
    ok(torchrun("compress", *args, "--out", "two", cwd=tmp_path))
    with one_thread():
        ok(invoke("compress", *args, "--out", tmp_path / "one"))
    a, b = (load_file(tmp_path / side / "model.safetensors") for side in ("two", "one"))
    assert a.keys() == b.keys()
    factored = [n[: -len(".lowrank_A")] for n in a if n.endswith(".lowrank_A")]
    assert factored
    for name in factored:
        got = a[f"{name}.lowrank_B"].double() @ a[f"{name}.lowrank_A"].double()
        want = b[f"{name}.lowrank_B"].double() @ b[f"{name}.lowrank_A"].double()
        assert float((got - want).abs().max()) <= SV_RTOL * float(want.abs().max()), name
    assert all(torch.equal(a[n], b[n]) for n in a if ".lowrank_" not in n)
    report = "compress-report.parquet"
    two, one = pd.read_parquet(tmp_path / "two" / report), pd.read_parquet(tmp_path / "one" / report)
    assert two["calibrated"].fillna(False).any()
    assert_same_report(two, one)


def test_trajectory_under_two_processes_equals_one(tmp_path):
    steps = sorted(str(p) for p in (SAMPLES / "dmf").glob("step-*.safetensors"))
    ok(torchrun("trajectory", *steps, "--out", "two.parquet", "-q", cwd=tmp_path))
    ok(invoke("trajectory", *steps, "--out", tmp_path / "one.parquet", "-q"))
    lists = ("singular_values", "u_angles", "v_angles")
    two, one = pd.read_parquet(tmp_path / "two.parquet"), pd.read_parquet(tmp_path / "one.parquet")
    for column in ("u_angles", "v_angles"):  # degrees, not singular values: compare with an angle tolerance
        for x, y in zip(two.pop(column), one.pop(column), strict=True):
            x, y = np.array(x, dtype=float), np.array(y, dtype=float)
            assert np.allclose(x, y, atol=1e-6, equal_nan=True)
    assert_same_report(two, one, lists)


@pytest.fixture
def capture_helper(tmp_path):
    (tmp_path / f"{HELPER}.py").write_text(textwrap.dedent(HELPER_SOURCE))
    return _block_batches(tmp_path / "b.safetensors", shift=True)


def test_capture_moments_under_two_processes_equal_one(tmp_path, capture_helper, monkeypatch):
    """Six batches, three per process; odd batches feed k another tensor than q and v."""
    args = ("--model", f"{HELPER}:build", "--inputs", capture_helper, "--batch-size", "4", "--device", "cpu")
    two = ok(torchrun("capture", *args, "--out", "two.safetensors", "--json", cwd=tmp_path))
    monkeypatch.chdir(tmp_path)
    with one_thread():
        one = ok(invoke("capture", *args, "--out", tmp_path / "one.safetensors", "--json"))
    a, b = json.loads(two.stdout), json.loads(one.stdout)
    assert (a["batches"], a["groups"], a["modules"]) == (b["batches"], b["groups"], b["modules"])
    assert a["groups"] and not any("k" in g for g in a["groups"])  # k split off its group on odd batches
    got, want = read_activations([tmp_path / "two.safetensors"]), read_activations([tmp_path / "one.safetensors"])
    assert got.keys() == want.keys() and len(got) == 7
    for name, m in want.items():
        assert (got[name].count, got[name].nonfinite) == (m.count, m.nonfinite) == (110, 0)
        assert _rel(got[name].xtx, m.xtx) <= 1e-12 and _rel(got[name].total, m.total) <= 1e-12, name
    # Negative control: rank 0's block of batches alone is far from the whole.
    with pytest.warns(UserWarning, match="never ran"):
        half = capture(load_model(f"{HELPER}:build"), open_batches(capture_helper, batch_size=4).part(range(3)))
    assert all(_rel(half.moments[n].xtx, want[n].xtx) > 0.1 for n in want)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / float(want.abs().max())


def test_capture_raw_rows_keep_batch_order_under_two_processes(tmp_path, capture_helper, monkeypatch):
    args = ("--model", f"{HELPER}:build", "--inputs", capture_helper, "--batch-size", "4", "--device", "cpu", "--raw",
            "--max-rows", "70", "-q")  # fmt: skip
    ok(torchrun("capture", *args, "--out", "two.safetensors", cwd=tmp_path))
    monkeypatch.chdir(tmp_path)
    ok(invoke("capture", *args, "--out", tmp_path / "one.safetensors"))
    got, want = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) and len(want[n]) == 70 for n in want)  # 70 of 110 rows: past rank 0's 60


# ------------------------------------------------------------------------------------- failure


def test_a_corrupt_tensor_on_rank_1_fails_every_process_with_one_line(tmp_path):
    """A flipped byte in a tensor rank 1 reads (its CRC fails only when read): rank 0 learns it
    through the exchange, prints one line naming file and tensor, and both processes exit 2."""
    sd = load_file(FT)
    path = tmp_path / "flipped.pt"
    torch.save(sd, path)
    with open_checkpoint(path) as ckpt:
        specs = select_matrices(ckpt).specs
    victim = split(specs, EngineConfig.create(device="cpu").cost, 2)[1][0].name
    _flip(path, _local_data_offset(path, _member(path, f"/data/{list(sd).index(victim)}")))
    result = torchrun("spectrum", path, "--device", "cpu", "--out", "r.parquet", cwd=tmp_path)
    assert result.returncode != 0  # torchrun's own code (1) when a process fails
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert errors[0].startswith(f"Error: {path}: zip record ")
    assert f"(storage of tensor {victim!r}) is corrupt" in errors[0]
    assert errors[0].endswith("(on process 1 of 2)")
    # torchrun's summary: both processes exited 2 (none was stopped by a signal first).
    assert sorted(re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", output, re.MULTILINE)) == ["2", "2"], output
    assert not [line for line in output.splitlines() if line.strip().startswith("File") and "lowrank_audit" in line]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flipped.pt"]  # no report, no temporary


def test_the_report_comparison_fails_on_a_changed_value_or_order():
    """Negative control for assert_same_report: a singular value moved by 10x the tolerance, or
    two rows swapped, fail it."""
    one = spectrum(FT, base=BASE, device="cpu", hashed=False)
    assert_same_report(one.copy(), one)
    moved = one.copy()
    values = np.array(moved.at[0, "singular_values"])
    values[1] += 10 * SV_RTOL * values[0]
    moved.at[0, "singular_values"] = values
    with pytest.raises(AssertionError):
        assert_same_report(moved, one)
    with pytest.raises(AssertionError):
        assert_same_report(one.iloc[[1, 0, *range(2, len(one))]].reset_index(drop=True), one)


# ---------------------------------------------------------------- the exchanges, in one group


def _scenarios(rank: int, port: int, folder: str) -> None:
    """Run in each of two processes of one gloo group (torch.multiprocessing.spawn); each
    scenario's outcome is written to ``folder/rank-N.json`` for the test to read."""
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}  # fmt: skip
    from lowrank_audit import distributed
    from lowrank_audit.analyses.capture import Capture, combine
    from lowrank_audit.errors import OptionError

    # The group a script initializes itself, adopted by join() (torchrun's own path is tested above).
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    world = distributed.join("cpu", 60)
    out: dict[str, Any] = {"rank": world.rank, "size": world.size, "backend": world.backend}

    def outcome(fn: Any) -> Any:
        try:
            return ["ok", fn()]
        except Exception as exc:  # noqa: BLE001 - the outcome is what is tested
            return [type(exc).__name__, str(exc), getattr(exc, "exit_code", None), distributed.told(exc)]

    # Rank 0's own work fails inside on_main: it raises its error, the other a PeerFailure.
    def write() -> int:
        raise OptionError("cannot write out.parquet")

    out["on_main"] = outcome(lambda: world.on_main(write))
    # Results to rank 0 only, one process at a time, in rank order.
    out["gather_main"] = outcome(lambda: world.gather(lambda: [world.rank] * 3, everywhere=False))
    # A failure outside any exchange on rank 1 reaches rank 0 at its next exchange.
    if world.rank == 1:
        out["conclude"] = outcome(lambda: (_ for _ in ()).throw(distributed.conclude(OptionError("bad share"))))
    else:
        out["conclude"] = outcome(lambda: world.run(lambda: 1))
    # A failure on rank 1 alone before rank 0's on_main: heard first, and rank 0 writes nothing.
    written: list[int] = []
    if world.rank == 1:
        out["before_on_main"] = outcome(lambda: (_ for _ in ()).throw(distributed.conclude(OptionError("no input"))))
    else:
        out["before_on_main"] = outcome(lambda: world.on_main(lambda: written.append(1)))
    out["written"] = written
    # Sums into rank 0's tensors; the others' stay as they were only if they passed copies.
    t = torch.full((3,), float(world.rank + 1), dtype=torch.float64)
    world.reduce([t])
    out["reduce"] = t.tolist()
    # More processes than matrices: rank 1's share is empty, the report whole on both.
    rows = spectrum(FT, include=["lm_head.weight"], device="cpu", hashed=False)
    out["empty_share"] = [rows["name"].tolist(), rows.attrs["lowrank_audit"]["world_size"]]
    # Raw rows: rank 0 saw 30 rows, rank 1 80 (kept 70): rank 0 gets 30 + the first 40 of rank 1's.
    seen = 30 if world.rank == 0 else 80
    mine = torch.arange(min(seen, 70), dtype=torch.float32)[:, None] + 1000 * world.rank
    whole = combine(Capture({}, {"m": mine}, {"m": seen}, (), 1), world, raw=True, max_rows=70)
    out["raw"] = [whole.seen, whole.rows["m"][:, 0].tolist()]
    (Path(folder) / f"rank-{world.rank}.json").write_text(json.dumps(out))
    distributed.leave(None)
    torch.distributed.destroy_process_group()  # the script's own group: leave() does not destroy it


def test_exchanges_between_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_scenarios, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2))
    assert (zero["size"], zero["backend"], one["rank"]) == (2, "gloo", 1)
    assert zero["on_main"] == ["OptionError", "cannot write out.parquet", 2, True]
    assert one["on_main"] == ["PeerFailure", "cannot write out.parquet", 2, True]
    assert zero["gather_main"] == ["ok", [[0, 0, 0], [1, 1, 1]]] and one["gather_main"] == ["ok", []]
    assert zero["conclude"] == ["PeerFailure", "bad share (on process 1 of 2)", 2, True]
    assert one["conclude"] == ["OptionError", "bad share", 2, True]
    assert zero["before_on_main"] == ["PeerFailure", "no input (on process 1 of 2)", 2, True]
    assert one["before_on_main"] == ["OptionError", "no input", 2, True] and zero["written"] == []
    assert zero["reduce"] == [3.0, 3.0, 3.0]
    assert zero["empty_share"] == one["empty_share"] == [["lm_head.weight"], 2]
    assert zero["raw"] == [{"m": 110}, list(range(30)) + [1000.0 + i for i in range(40)]]


def test_an_error_every_process_meets_before_any_exchange_is_printed_once(tmp_path):
    (tmp_path / "r.parquet").write_bytes(b"kept")
    result = torchrun("spectrum", FT, "--device", "cpu", "--out", "r.parquet", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert [line for line in output.splitlines() if line.startswith("Error:")] == [
        "Error: --out r.parquet exists; use --force to replace it"
    ]
    assert sorted(re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", output, re.MULTILINE)) == ["2", "2"], output
    assert (tmp_path / "r.parquet").read_bytes() == b"kept"


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "1e15"])
def test_dist_timeout_must_be_a_positive_number_of_seconds(value):
    result = invoke("spectrum", FT, "--dist-timeout", value, "-q")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("Error: dist-timeout must be a positive number of seconds up to 10000000")
