"""The command line: output, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lowrank_audit.cli import app
from tests.conftest import RunsCode

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "160"})


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_spectrum_with_base_writes_report_and_table(samples, tmp_path):
    out = tmp_path / "r.parquet"
    result = invoke("spectrum", samples / "finetuned.safetensors", "--base", samples / "base.safetensors", "--out", out)
    assert result.exit_code == 0, result.output
    assert "Most low-rank updates" in result.stdout and "model.layers.0.mlp.down_proj" in result.stdout
    assert "Audited 16 matrices from 16 tensors on cpu" in result.stdout and f"report written to {out}" in result.stdout
    frame = pd.read_parquet(out)  # plain pandas reads it
    assert len(frame) == 16 and (frame["kind"] == "delta").all()
    assert json.loads(pq.read_schema(out).metadata[b"lowrank_audit"])["command"].startswith("lowrank-audit")


def test_json_summary_is_machine_readable(samples):
    result = invoke("spectrum", samples / "synthetic.safetensors", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["matrices"] == 8 and summary["report"] is None
    rows = {(r["name"], r["expert"]): r for r in summary["rows"]}
    assert rows[("noisy_rank4.weight", None)]["k95"] == 3 and rows[("experts.weight", 2)]["rows"] == 32
    assert set(summary["skipped"]) == {"norm.weight", "token_ids"}


def test_include_exclude_and_top(samples):
    result = invoke(
        "spectrum", samples / "base.safetensors", "-i", "*mlp*", "-x", "*down_proj*", "--top", "2", "--json"
    )
    assert {r["role"] for r in json.loads(result.stdout)["rows"]} == {"gate_proj", "up_proj"}
    table = invoke("spectrum", samples / "base.safetensors", "--top", "2")
    assert "(2 of 16, by k95%)" in table.stdout


def test_missing_file(tmp_path):
    assert_one_line_error(invoke("spectrum", tmp_path / "nope.safetensors"), "nope.safetensors", "no such file")


def test_truncated_and_garbled(samples, tmp_path):
    assert_one_line_error(
        invoke("spectrum", samples / "truncated.safetensors"), "truncated.safetensors", "truncated file"
    )
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_one_line_error(invoke("spectrum", garbled, "--out", tmp_path / "r.parquet"), "garbled.safetensors")
    assert not (tmp_path / "r.parquet").exists()


def test_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(4, 4), "x": RunsCode(str(marker))}, tmp_path / "evil.pt")
    assert_one_line_error(invoke("spectrum", tmp_path / "evil.pt", "--out", tmp_path / "r.parquet"), "evil.pt")
    assert not marker.exists() and not (tmp_path / "r.parquet").exists()


def test_base_with_different_shape(samples, tmp_path):
    tensors = load_file(samples / "base.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, tmp_path / "other.safetensors")
    out = tmp_path / "r.parquet"
    result = invoke(
        "spectrum", samples / "finetuned.safetensors", "--base", tmp_path / "other.safetensors", "--out", out
    )
    assert_one_line_error(result, "model.layers.1.mlp.up_proj.weight", "[128, 64]", "[64, 128]", "other.safetensors")
    assert not out.exists()


def test_output_equal_to_input_is_refused(samples, tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes((samples / "base.safetensors").read_bytes())
    before = src.read_bytes()
    assert_one_line_error(invoke("spectrum", src, "--out", src), "would overwrite input")
    assert src.read_bytes() == before


def test_bad_options(samples):
    assert_one_line_error(
        invoke("spectrum", samples / "base.safetensors", "--dtype", "float16"), "dtype must be one of"
    )
    assert_one_line_error(invoke("spectrum", samples / "base.safetensors", "--device", "tpu"), "device must be")
    assert_one_line_error(invoke("spectrum", samples / "base.safetensors", "-i", "*zzz*"), "no matrix to audit")
    assert invoke("spectrum").exit_code == 2  # usage error from the parser


def test_unpaired_tensors_warn_but_succeed(samples, tmp_path):
    tensors = load_file(samples / "base.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "b.safetensors")
    result = invoke("spectrum", samples / "finetuned.safetensors", "--base", tmp_path / "b.safetensors")
    assert result.exit_code == 0
    assert "Warning: 1 tensors not paired with base, skipped: lm_head.weight (only in fine-tune)" in result.stderr


def test_help_and_version_do_not_import_torch():
    code = "\n".join([
        "import sys",
        "from lowrank_audit.cli import main",
        "sys.argv = ['lowrank-audit', '{}']",
        "try: main()",
        "except SystemExit: pass",
        "assert 'torch' not in sys.modules and 'pandas' not in sys.modules, 'heavy import'",
    ])  # fmt: skip
    for flag in ("--help", "--version"):
        proc = subprocess.run([sys.executable, "-c", code.format(flag)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr


def test_spectrum_table_and_json_import_neither_pandas_nor_pyarrow(samples):
    """Only --out builds the report frame; the table and JSON render the rows without it."""
    code = "\n".join([
        "import sys",
        "from lowrank_audit.cli import main",
        "sys.argv = ['lowrank-audit', 'spectrum', *sys.argv[1:]]",
        "try: main()",
        "except SystemExit as exc: assert not exc.code, exc.code",
        "assert not {'pandas', 'pyarrow'} & set(sys.modules), 'pandas or pyarrow imported'",
    ])  # fmt: skip
    for flags in ((), ("--json",), ("--quiet",)):
        args = [sys.executable, "-c", code, str(samples / "synthetic.safetensors"), *flags]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr


def test_python_dash_m(samples):
    proc = subprocess.run([sys.executable, "-m", "lowrank_audit", "spectrum", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--base" in proc.stdout


def test_every_command_has_help_and_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        assert invoke(name, "--help").exit_code == 0
        assert f"lowrank-audit {name}" in readme, name


def test_method_options(samples):
    args = ("--method", "randomized", "--rank-cap", "3", "--json")
    result = invoke("spectrum", samples / "synthetic.safetensors", *args)
    assert result.exit_code == 0, result.output
    rows = {(r["name"], r["expert"]): r for r in json.loads(result.stdout)["rows"]}
    exact4 = rows[("exact_rank4.weight", None)]
    # Three values and the residual prove the rank-4 matrix's k99 is 4 (lowrank_audit.bounds).
    assert (exact4["method"], exact4["k"], exact4["k95"], exact4["k99"]) == ("randomized", 3, 3, 4)
    assert exact4["effective_rank"] is None  # needs the whole spectrum
    conv = rows[("conv.weight", None)]
    assert conv["k95"] is None and conv["k95_lo"] < conv["k95_hi"]
    table = invoke("spectrum", samples / "synthetic.safetensors", "--method", "randomized", "--rank-cap", "3")
    assert "energy ranks not certified within 1 %" in table.stdout
    assert_one_line_error(invoke("spectrum", samples / "base.safetensors", "--method", "svd"), "method must be one of")
    assert_one_line_error(
        invoke("spectrum", samples / "base.safetensors", "--method", "exact", "--rank-cap", "4"), "rank-cap"
    )


COMMANDS = ["spectrum", "recommend", "compress", "expand", "check", "activations", "capture"]


def test_help_has_no_type_placeholders():
    for command in ["", *COMMANDS]:
        done = subprocess.run(
            [sys.executable, "-m", "lowrank_audit", *([command] if command else []), "--help"],
            capture_output=True, text=True, check=True, env={"COLUMNS": "200", "PATH": ""},
        )  # fmt: skip
        for placeholder in ("<bool>", "<path>", "<str>", "<list", "{"):
            assert placeholder not in done.stdout, (command, placeholder)
        if command:
            assert "--force" in done.stdout, command


def test_help_placeholder_check_can_fail():
    # Negative control: Typer's own rendering of a bare app shows the placeholders the test above forbids.
    import typer
    from typer.testing import CliRunner

    bare = typer.Typer()

    @bare.command()
    def go(path: Path, flag: bool = False) -> None: ...

    output = CliRunner().invoke(bare, ["--help"], env={"COLUMNS": "200"}).output
    assert "<bool>" in output and "{path}" in output and "<path>" in output


def test_quiet_leaves_only_the_verdict(samples):
    for args in (
        ["spectrum", samples / "finetuned.safetensors"],
        ["recommend", samples / "finetuned.safetensors", "--base", samples / "base.safetensors"],
    ):
        loud, quiet = invoke(*args), invoke(*args, "--quiet")
        assert loud.exit_code == quiet.exit_code == 0
        assert len(loud.stdout.splitlines()) > 5 and len(quiet.stdout.strip().splitlines()) == 1, quiet.stdout


def test_json_and_top_in_every_reporting_command(samples, tmp_path):
    ft, base = samples / "finetuned.safetensors", samples / "base.safetensors"
    runs = {
        "spectrum": invoke("spectrum", ft, "--base", base, "--json"),
        "recommend": invoke("recommend", ft, "--base", base, "--json"),
        "compress": invoke("compress", ft, "--base", base, "--rank", "2", "--out", tmp_path / "a", "--json"),
    }
    for command, result in runs.items():
        assert result.exit_code == 0, (command, result.output)
        data = json.loads(result.stdout)
        assert len(data["rows"]) >= 14, command
    top = invoke("recommend", ft, "--base", base, "--top", "3")
    assert "3 of 16 layers" in top.stdout and "model.embed_tokens" in top.stdout and "model.layers.1" not in top.stdout


def test_error_lines_keep_colon_words_literal(tmp_path):
    # ":x:" is a rich emoji code; a path holding it must reach the user as typed.
    missing = tmp_path / "model:x:.safetensors"
    result = invoke("spectrum", missing)
    assert_one_line_error(result, f"{missing}: no such file or folder")


def test_capture_on_an_empty_batch_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "factory.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    save_file({"input": torch.zeros(0, 4)}, tmp_path / "empty.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "lowrank_audit", "capture", "--model", "factory:build", "--inputs", "empty.safetensors",
         "--out", "acts.safetensors"], capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("Error: empty.safetensors:") and "\n" not in result.stderr.strip()
    assert not (tmp_path / "acts.safetensors").exists()


def test_recommend_takes_the_conv_kernels_spectrum_audits(tmp_path):
    """A conv kernel is audited as out x (in*kh*kw), the matrix PEFT's conv LoRA factors: it gets a rank."""
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(16, 2, generator=gen), torch.randn(2, 72, generator=gen)
    ckpt = tmp_path / "conv.safetensors"
    save_file({"conv.weight": (u @ v).reshape(16, 8, 3, 3).contiguous()}, ckpt)
    assert invoke("spectrum", ckpt).exit_code == 0
    result = invoke("recommend", ckpt, "--energy", "0.99", "--json", "--peft-config", str(tmp_path / "c.json"))
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]
    assert (row["name"], row["rows"], row["cols"], row["rank"]) == ("conv.weight", 16, 72, 2)
    assert json.loads((tmp_path / "c.json").read_text())["target_modules"] == ["conv"]


def test_names_with_markup_brackets_are_printed_as_they_are(tmp_path):
    """Tensor names and paths reach the terminal as text, never as rich markup (``[/]`` would end a tag)."""
    bad = torch.ones(4, 3)
    bad[0, 0] = float("nan")
    ckpt = tmp_path / "markup.safetensors"
    save_file({"x[/].weight": bad, "ok[b].weight": torch.randn(4, 3)}, ckpt)
    for command in ("spectrum", "recommend"):
        result = invoke(command, ckpt)
        assert result.exit_code == 0, result.output
        assert "non-finite: x[/].weight has 1 NaN/Inf entries" in result.stdout
    out = tmp_path / "o[/]"
    result = invoke("compress", ckpt, "--exclude", "x*", "--rank", "1", "--out", str(out))
    assert result.exit_code == 0 and f"written to {out}" in result.stdout, result.output
