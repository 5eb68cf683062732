"""``lowrank-audit check`` from the command line: exit codes, JUnit, Markdown, and the CI workflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lowrank_audit.cli import app
from lowrank_audit.formats.report import read_report
from lowrank_audit.rules import NEEDS
from tests.conftest import SAMPLES

ROOT = SAMPLES.parent
BASE, FT = str(SAMPLES / "base.safetensors"), str(SAMPLES / "finetuned.safetensors")
runner = CliRunner()

HOLDS = """
[[rule]]
column = "k95_ratio"
min = 0.25

[[rule]]
column = "stable_rank"
layers = "*self_attn*"
max = 32
"""
FAILS = HOLDS.replace("max = 32", "max = 11")  # three attention matrices have stable rank 11.2 to 11.8

UPDATES = NEEDS["updates"]


@pytest.fixture(autouse=True)
def _away_from_our_pyproject(tmp_path, monkeypatch):
    """Run every check from an empty folder, so the repository's own policy is not found."""
    monkeypatch.chdir(tmp_path)


def write_policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gate.toml"
    path.write_text(text)
    return str(path)


def junit_cases(path: Path) -> dict[str, ET.Element]:
    """Parse a JUnit file, check its counts add up, and return its test cases by name."""
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert int(root.get("tests")) == int(suite.get("tests")) == len(cases)
    assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
    assert int(suite.get("skipped")) == sum(c.find("skipped") is not None for c in cases)
    assert suite.get("errors") == "0" and all(c.get("classname") == "lowrank_audit.check" for c in cases)
    return {c.get("name"): c for c in cases}


def run_check(tmp_path: Path, *args: str) -> tuple[int, str, Path, Path]:
    junit, md = tmp_path / "check.xml", tmp_path / "check.md"
    result = runner.invoke(app, ["check", *args, "--junit", str(junit), "--markdown", str(md), "--force"])
    return result.exit_code, result.output, junit, md


def test_a_policy_that_holds_exits_0(tmp_path):
    code, output, junit, md = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, HOLDS))
    assert code == 0, output
    assert output.endswith(
        "passed: 3 of 5 rules hold, 2 skipped (forbid-added-layers, forbid-removed-layers: needs --baseline REPORT); "
        f"policy: {tmp_path / 'gate.toml'}\n"
    )
    cases = junit_cases(junit)
    assert list(cases) == ["forbid-nonfinite", "k95_ratio ≥ 0.25", "stable_rank ≤ 32 on layers *self_attn*",
                           "forbid-added-layers", "forbid-removed-layers"]  # fmt: skip
    assert cases["forbid-added-layers"].find("skipped").get("message") == "needs --baseline REPORT"
    assert md.read_text().startswith("## ✅ lowrank-audit check passed: 3 of 5 rules hold, 2 skipped\n")


def test_a_bound_the_sample_breaks_exits_1_with_the_finding_everywhere(tmp_path):
    code, output, junit, md = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, FAILS))
    assert code == 1, output
    assert "FAILED: 1 of 5 rules broken, 3 findings, 2 skipped (" in output
    assert re.search(r"model\.layers\.0\.self_attn\.k_proj\.weight\s+11\.79\s+≤ 11", output)
    failure = junit_cases(junit)["stable_rank ≤ 11 on layers *self_attn*"].find("failure")
    assert failure.get("message") == (
        "model.layers.0.self_attn.k_proj.weight: stable_rank = 11.79 is above the maximum 11; limit ≤ 11; and 2 more"
    )
    assert failure.text.splitlines()[2] == (
        "model.layers.1.self_attn.v_proj.weight: stable_rank = 11.81 is above the maximum 11; limit ≤ 11"
    )
    assert (
        "| `stable_rank ≤ 11 on layers *self_attn*` | `model.layers.1.self_attn.v_proj.weight` | 11.81 | ≤ 11 |"
        in md.read_text()
    )


def test_a_claimed_rank_the_update_exceeds_exits_1(tmp_path):
    policy = write_policy(tmp_path, '[adapter-rank]\nrank = 16\nroles = "down_proj"')
    code, output, junit, md = run_check(tmp_path, FT, "--base", BASE, "--policy", policy)
    assert code == 1, output
    failure = junit_cases(junit)["adapter rank ≤ 16 at 0.01·σ₁ on roles down_proj"].find("failure")
    assert failure.text.splitlines() == [
        "model.layers.0.mlp.down_proj.weight: 48 singular values above 0.01·σ₁; the claim is 16; limit ≤ 16",
        "model.layers.1.mlp.down_proj.weight: 57 singular values above 0.01·σ₁; the claim is 16; limit ≤ 16",
    ]
    assert "| `model.layers.1.mlp.down_proj.weight` | 57 | ≤ 16 |" in md.read_text()
    assert "model.layers.0.mlp.down_proj.weight" in output


def test_one_finding_is_singular_in_every_output(tmp_path):
    one = HOLDS.replace("max = 32", "max = 11.8")  # v_proj of layer 1 only: 11.81
    code, output, junit, md = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, one))
    assert code == 1 and "FAILED: 1 of 5 rules broken, 1 finding, 2 skipped (" in output
    assert junit_cases(junit)["stable_rank ≤ 11.8 on layers *self_attn*"].find("system-out").text == (
        "8 layers checked, 1 finding"
    )
    assert md.read_text().startswith("## ❌ lowrank-audit check failed: 1 of 5 rules broken, 1 finding, 2 skipped\n")
    two = HOLDS.replace("max = 32", "max = 11.5")  # k_proj of layer 0 too: 11.79
    code, output, *_ = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, two), "--top", "1")
    assert code == 1 and "\n1 more finding not shown (--top" in output and ", 2 findings, " in output


# --- rules that cannot run -----------------------------------------------------------------

CLAIM = "[adapter-rank]\nrank = 16\n"
CLAIM_LABEL = "adapter rank ≤ 16 at 0.01·σ₁"


def test_an_adapter_rank_rule_without_base_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "spectrum.parquet"
    code, output, junit, md = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, CLAIM), "-o", str(out))
    assert code == 2
    assert output == (
        f"Error: rule '{CLAIM_LABEL}' cannot run: {UPDATES}; a gate never passes a rule it could not "
        'evaluate (to skip it instead, set unevaluable = "skip" in its table)\n'
    )
    assert not junit.exists() and not md.exists() and not out.exists()
    assert output.strip() in (ROOT / "docs" / "ci.md").read_text()  # the example there is this line
    # A report of weights as SOURCE: refused the same way once read.
    report = tmp_path / "weights.parquet"
    assert runner.invoke(app, ["spectrum", FT, "-o", str(report), "-q"]).exit_code == 0
    code, output, *_ = run_check(tmp_path, str(report), "--policy", write_policy(tmp_path, CLAIM))
    assert code == 2 and output.startswith(f"Error: rule '{CLAIM_LABEL}' cannot run: {UPDATES};")
    # Negative control: with --base the same policy runs, and a full fine-tune breaks the claim.
    code, output, *_ = run_check(tmp_path, FT, "--base", BASE, "--policy", write_policy(tmp_path, CLAIM))
    assert code == 1 and "FAILED: 1 of 4 rules broken, 16 findings" in output


def test_an_adapter_rank_rule_allowed_to_skip_says_so_in_the_verdict(tmp_path):
    policy = write_policy(tmp_path, CLAIM + 'unevaluable = "skip"\n')
    code, output, junit, md = run_check(tmp_path, FT, "--policy", policy, "--quiet")
    assert code == 0
    assert output == (  # --quiet: the verdict line alone
        f"passed: 1 of 4 rules hold, 3 skipped ({CLAIM_LABEL}: {UPDATES}; forbid-added-layers, "
        f"forbid-removed-layers: needs --baseline REPORT); policy: {policy}\n"
    )
    assert junit_cases(junit)[CLAIM_LABEL].find("skipped").get("message") == f"{UPDATES}"
    assert f"| ⏭️ | `{CLAIM_LABEL}` | — | skipped: {UPDATES} |" in md.read_text()
    # Negative control: allowed to skip, it still runs and fails when it can.
    code, *_ = run_check(tmp_path, FT, "--base", BASE, "--policy", policy)
    assert code == 1


def test_a_drift_rule_without_baseline_exits_2_unless_allowed(tmp_path):
    drift = '[[drift]]\ncolumn = "spectral_norm"\nmax = 0.1\n'
    code, output, junit, _ = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, drift))
    assert code == 2 and not junit.exists()
    assert output.startswith("Error: rule 'spectral_norm drift ≤ 10 %' cannot run: needs --baseline REPORT;")
    code, output, junit, _ = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, drift + 'unevaluable = "skip"'))
    assert code == 0 and "(spectral_norm drift ≤ 10 %, forbid-added-layers, forbid-removed-layers: needs" in output
    assert junit_cases(junit)["spectral_norm drift ≤ 10 %"].find("skipped").get("message") == "needs --baseline REPORT"


def test_a_glob_matching_nothing_exits_2_or_shows_in_the_table_when_allowed(tmp_path):
    typo = '[[rule]]\ncolumn = "k95"\nroles = "q_prj"\nmax = 1000\n'
    code, output, junit, _ = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, typo))
    assert code == 2 and not junit.exists()
    assert output.startswith(
        "Error: rule 'k95 ≤ 1000 on roles q_prj' cannot run: roles q_prj match no layer of the report;"
    )
    code, output, junit, md = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, typo + 'unevaluable = "skip"'))
    assert code == 0
    assert re.search(r"skip\s+k95 ≤ 1000 on roles q_prj\s+—\s+roles q_prj match no layer of the report\s", output)
    assert junit_cases(junit)["k95 ≤ 1000 on roles q_prj"].find("skipped").get("message") == (
        "roles q_prj match no layer of the report"
    )
    assert (
        "| ⏭️ | `k95 ≤ 1000 on roles q_prj` | — | skipped: roles q\\_prj match no layer of the report |"
        in md.read_text()
    )
    # Negative control: spelled right, the rule checks the two q_proj matrices.
    code, output, *_ = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, typo.replace("q_prj", "q_proj")))
    assert code == 0 and re.search(r"pass\s+k95 ≤ 1000 on roles q_proj\s+2\s+0\s", output)


def test_a_column_absent_from_a_report_exits_2_naming_rule_and_column(tmp_path, monkeypatch):
    """An older report lacking a column (read_report refuses those files; a library caller may not)."""
    import lowrank_audit.analyses.spectrum as analyses

    report = read_report(_sample_report(tmp_path))
    monkeypatch.setattr(analyses, "load_spectrum", lambda *args, **kwargs: report.drop(columns=["k95_ratio"]))
    code, output, junit, _ = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, HOLDS))
    assert code == 2 and not junit.exists()
    assert output.startswith("Error: rule 'k95_ratio ≥ 0.25' cannot run: column k95_ratio absent from the report;")
    # Negative control: the full report passes the same policy.
    monkeypatch.setattr(analyses, "load_spectrum", lambda *args, **kwargs: report)
    assert run_check(tmp_path, FT, "--policy", write_policy(tmp_path, HOLDS))[0] == 0


def _sample_report(tmp_path: Path) -> Path:
    path = tmp_path / "sample.parquet"
    assert runner.invoke(app, ["spectrum", FT, "-o", str(path), "-q", "--force"]).exit_code == 0
    return path


def test_drift_against_a_baseline_made_from_the_base_exits_1(tmp_path):
    baseline = tmp_path / "last-release.parquet"
    assert runner.invoke(app, ["spectrum", BASE, "-o", str(baseline), "-q"]).exit_code == 0
    policy = write_policy(tmp_path, '[[drift]]\ncolumn = "spectral_norm"\nmax = 0.1')
    code, output, junit, md = run_check(tmp_path, FT, "--baseline", str(baseline), "--policy", policy)
    assert code == 1, output
    cases = junit_cases(junit)
    assert cases["spectral_norm drift ≤ 10 %"].find("failure").get("message") == (
        "model.layers.0.mlp.down_proj.weight: spectral_norm 1.029 → 1.348 (31 % change); limit ≤ 10 %"
    )
    assert cases["forbid-added-layers"].find("failure") is None and cases["forbid-added-layers"].find("skipped") is None
    assert "| `model.layers.0.mlp.down_proj.weight` | 31 % | ≤ 10 % |" in md.read_text()
    assert re.search(r"model\.layers\.0\.mlp\.down_proj\.weight\s+31 %\s+≤ 10 %", output)
    # Negative control: the base against its own report does not drift.
    code, *_ = run_check(tmp_path, BASE, "--baseline", str(baseline), "--policy", policy)
    assert code == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\ncolumn = "stable_rank"\nmax = "64"', "rule[1].max: must be a finite number but got '64' (string)"),
        ('[[rule]]\ncolumn = "stable_rank"\nmax = 64\nlayer = "*"', "rule[1].layer: unknown key"),
        ('[[drift]]\ncolumn = "k95"\nmax = 0.1\nroles = "[qk_proj"', "drift[1].roles: bad glob"),
        ("[[rule]]\ncolumn = ", "not valid TOML"),
    ],
)
def test_a_malformed_policy_exits_2_naming_the_key_and_writes_nothing(tmp_path, text, message):
    code, output, junit, md = run_check(tmp_path, FT, "--policy", write_policy(tmp_path, text))
    assert code == 2
    assert output.startswith(f"Error: {tmp_path / 'gate.toml'}: ") and message in output
    assert "Traceback" not in output and not junit.exists() and not md.exists()


def test_a_checkpoint_and_its_report_give_the_same_findings(tmp_path):
    report = tmp_path / "d.parquet"
    assert runner.invoke(app, ["spectrum", FT, "--base", BASE, "-o", str(report), "-q"]).exit_code == 0
    policy = write_policy(tmp_path, FAILS + "\n[adapter-rank]\nrank = 55\n")
    outputs = []
    for source in ([FT, "--base", BASE], [str(report)]):
        result = runner.invoke(app, ["check", *source, "--policy", policy, "--json"])
        assert result.exit_code == 1
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1]
    # 8 updates keep 95 % in under a quarter of their rank; 8 have more than 55 values above 1e-2.
    assert [len(r["findings"]) for r in outputs[0]["rules"]] == [0, 8, 0, 8, 0, 0]
    assert outputs[0]["source"] == f"{FT} - {BASE}"


def test_out_writes_the_report_that_spectrum_writes(tmp_path):
    assert runner.invoke(app, ["check", FT, "-o", str(tmp_path / "c.parquet"), "-q"]).exit_code == 0
    assert runner.invoke(app, ["spectrum", FT, "-o", str(tmp_path / "s.parquet"), "-q"]).exit_code == 0
    checked, spectrum = (read_report(tmp_path / n) for n in ("c.parquet", "s.parquet"))
    assert checked.equals(spectrum)


def test_outputs_never_replace_inputs(tmp_path):
    report = tmp_path / "r.parquet"
    assert runner.invoke(app, ["spectrum", FT, "-o", str(report), "-q"]).exit_code == 0
    before = report.read_bytes()
    result = runner.invoke(app, ["check", FT, "--baseline", str(report), "--junit", str(report)])
    assert result.exit_code == 2 and "would overwrite input" in result.output and "--junit" in result.output
    result = runner.invoke(app, ["check", str(report), "-o", str(tmp_path / "x.parquet")])
    assert result.exit_code == 2 and "--out applies only when SOURCE is a checkpoint" in result.output
    assert report.read_bytes() == before and not (tmp_path / "x.parquet").exists()


def test_the_policy_is_found_in_pyproject_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(
        "[tool.lowrank-audit.check]\n" + FAILS.replace("[[rule]]", "[[tool.lowrank-audit.check.rule]]")
    )
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    result = runner.invoke(app, ["check", FT])
    assert result.exit_code == 1
    assert f"policy: {tmp_path / 'pyproject.toml'} [tool.lowrank-audit.check]" in result.output


def test_nan_fails_the_default_policy(tmp_path):
    tensors = load_file(FT)
    tensors["lm_head.weight"][0, 0] = float("inf")
    save_file(tensors, tmp_path / "inf.safetensors")
    result = runner.invoke(app, ["check", str(tmp_path / "inf.safetensors")])
    assert result.exit_code == 1 and "lm_head.weight" in result.output and "built-in defaults" in result.output


def test_help_shows_the_table_name_and_exit_codes():
    result = runner.invoke(app, ["check", "--help"])
    text = " ".join(result.output.replace("│", " ").split())  # rich wraps lines inside boxes
    assert result.exit_code == 0
    assert "[tool.lowrank-audit.check] table of the nearest pyproject.toml" in text
    assert "exit 0 when every rule holds, 1 when one fails, 2 on bad input" in text


# --- the workflow in docs/ci.md ------------------------------------------------------------

WORKFLOW = ROOT / ".github" / "workflows" / "release-gate.yml"


def test_the_docs_show_the_shipped_workflow():
    doc = (ROOT / "docs" / "ci.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", doc, re.S).group(1)
    assert block == WORKFLOW.read_text()
    steps = yaml.safe_load(block)["jobs"]["gate"]["steps"]
    assert [s.get("uses", "").split("@")[0] for s in steps if "uses" in s] == [
        "actions/checkout", "actions/setup-python", "actions/upload-artifact",
    ]  # fmt: skip


def run_step(name: str, workdir: Path, **env: str) -> subprocess.CompletedProcess:
    """Run one ``run:`` step of the workflow as GitHub does (bash -eo pipefail) with its env."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (step,) = [s for s in workflow["jobs"]["gate"]["steps"] if s.get("name") == name]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the console script
    environ = {**os.environ, **workflow["env"], "PATH": path, **env}
    return subprocess.run(["bash", "-eo", "pipefail", "-c", step["run"]], cwd=workdir, env=environ,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_workflow_gate_step_runs_as_written(tmp_path):
    """The repository's checkout as the runner sees it: our pyproject (with its policy) and the samples."""
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    (tmp_path / "sample_checkpoints").symlink_to(SAMPLES)
    assert runner.invoke(app, ["spectrum", BASE, "-o", str(tmp_path / "last.parquet"), "-q"]).exit_code == 0
    summary = tmp_path / "summary.md"

    done = run_step("Audit and check", tmp_path, BASELINE="last.parquet")
    assert done.returncode == 0, done.stdout + done.stderr
    assert read_report(tmp_path / "spectrum.parquet")["name"].nunique() == 16
    assert len(junit_cases(tmp_path / "check.xml")) == 7
    assert run_step("Job summary", tmp_path, GITHUB_STEP_SUMMARY=str(summary)).returncode == 0
    assert summary.read_text().startswith("## ✅ lowrank-audit check passed: 7 of 7 rules hold\n")

    # A release with a NaN fails the step (exit 1) and still leaves its reports.
    tensors = load_file(FT)
    tensors["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")
    save_file(tensors, tmp_path / "broken.safetensors")
    for written in ("check.md", "check.xml", "spectrum.parquet"):  # a fresh CI job starts without them
        (tmp_path / written).unlink()
    done = run_step("Audit and check", tmp_path, MODEL="broken.safetensors", BASELINE="last.parquet")
    assert done.returncode == 1
    assert "| ❌ | `forbid-nonfinite` | 16 | 1 |" in (tmp_path / "check.md").read_text()
    assert "model.layers.0.mlp.up_proj.weight" in junit_cases(tmp_path / "check.xml")["forbid-nonfinite"].find(
        "failure"
    ).get("message")


def test_the_workflow_gate_step_on_a_first_release(tmp_path):
    """No previous report: a drift rule stops the gate (exit 2, nothing written) unless it may be skipped."""
    (tmp_path / "sample_checkpoints").symlink_to(SAMPLES)
    drift = '[tool.lowrank-audit.check]\n[[tool.lowrank-audit.check.drift]]\ncolumn = "k95"\nmax = 0.25\n'
    (tmp_path / "pyproject.toml").write_text(drift)
    done = run_step("Audit and check", tmp_path)
    assert done.returncode == 2 and not (tmp_path / "check.md").exists()
    assert "Error: rule 'k95 drift ≤ 25 %' cannot run: needs --baseline REPORT;" in done.stderr
    (tmp_path / "pyproject.toml").write_text(drift + 'unevaluable = "skip"  # the first release has no baseline\n')
    done = run_step("Audit and check", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| ⏭️ | `k95 drift ≤ 25 %` | — | skipped: needs --baseline REPORT |" in (tmp_path / "check.md").read_text()
