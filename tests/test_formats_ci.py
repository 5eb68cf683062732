"""JUnit and Markdown writers on hand-made results: counts, escaping and the findings cap."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from lowrank_audit.formats.ci import MARKDOWN_FINDINGS, junit_xml, markdown
from lowrank_audit.policy import CheckResult
from lowrank_audit.rules import Finding, RuleResult


def result_with(findings: int) -> CheckResult:
    rule = "k95 ≤ 3 on layers *[qk]_proj*|x"
    found = tuple(
        Finding(rule, f"layer.{i}.weight", 4.0, "4", "≤ 3", "k95 = 4 is <above> the maximum 3") for i in range(findings)
    )
    results = (
        RuleResult(rule, findings, found),
        RuleResult("drift", 0, skipped="needs a baseline"),
        RuleResult("ok", 2),
    )
    return CheckResult(results, source="model|a.safetensors", policy="gate.toml")


def test_junit_counts_and_escaping():
    root = ET.fromstring(junit_xml(result_with(3), seconds=1.5))
    suite = root.find("testsuite")
    assert (root.get("tests"), root.get("failures"), root.get("skipped"), root.get("time")) == ("3", "1", "1", "1.500")
    failing, skipped, passing = suite.findall("testcase")
    assert failing.get("name") == "k95 ≤ 3 on layers *[qk]_proj*|x"
    assert failing.find("failure").get("message") == (
        "layer.0.weight: k95 = 4 is <above> the maximum 3; limit ≤ 3; and 2 more"
    )
    assert len(failing.find("failure").text.splitlines()) == 3
    assert skipped.find("skipped").get("message") == "needs a baseline" and passing.find("failure") is None
    assert [p.get("name") for p in suite.find("properties")] == ["source", "policy"]
    assert [c.find("system-out").text for c in suite.findall("testcase")] == [
        "3 layers checked, 3 findings", "0 layers checked, 0 findings", "2 layers checked, 0 findings",
    ]  # fmt: skip


def test_one_is_singular_everywhere():
    root = ET.fromstring(junit_xml(result_with(1)))
    assert root.find("testsuite/testcase/system-out").text == "1 layer checked, 1 finding"
    text = markdown(result_with(1))
    assert text.startswith("## ❌ lowrank-audit check failed: 1 of 3 rules broken, 1 finding, 1 skipped\n")
    assert markdown(result_with(MARKDOWN_FINDINGS + 1)).endswith(
        "… and 1 more finding: the JUnit report lists every finding.\n"
    )


def test_markdown_escapes_cells_and_caps_findings():
    text = markdown(result_with(MARKDOWN_FINDINGS + 5))
    assert text.startswith("## ❌ lowrank-audit check failed: 1 of 3 rules broken, 105 findings, 1 skipped\n")
    assert "**Source** `model\\|a.safetensors`" in text
    assert "| ⏭️ | `drift` | — | skipped: needs a baseline |" in text
    rows = [line for line in text.splitlines() if line.startswith("| `k95")]
    assert len(rows) == MARKDOWN_FINDINGS  # the rule's own row starts with its icon
    assert (
        rows[0]
        == "| `k95 ≤ 3 on layers *[qk]_proj*\\|x` | `layer.0.weight` | 4 | ≤ 3 | k95 = 4 is \\<above\\> the maximum 3 |"
    )
    assert text.endswith("… and 5 more findings: the JUnit report lists every finding.\n")
    # Negative control: under the cap nothing is left out.
    assert "more findings" not in markdown(result_with(3))
