"""A check's result as CI systems show it: JUnit XML (one test case per rule) and Markdown.

JUnit follows the schema Jenkins, GitLab and most test-report actions read: ``<testsuites>``
holding one ``<testsuite>``; a rule that failed has a ``<failure>`` whose ``message`` is
its first finding and whose text lists them all; a rule that could not run, and whose
policy allows that, has ``<skipped>`` with the reason (a rule that may not be skipped stops
the check before anything is written). The Markdown fits a job summary page (GitHub's
``$GITHUB_STEP_SUMMARY``).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from lowrank_audit.policy import CheckResult
from lowrank_audit.rules import Finding, RuleResult
from lowrank_audit.wording import plural

CLASSNAME = "lowrank_audit.check"
# GitHub caps a job summary at 1 MiB; a rule failing on every layer of a large model
# (thousands of rows) would overflow it, and the JUnit file keeps them all anyway.
MARKDOWN_FINDINGS = 100
_ICONS = {"passed": "✅", "failed": "❌", "skipped": "⏭️"}


def _line(finding: Finding) -> str:
    return f"{finding.layer}: {finding.message}; limit {finding.limit}"


def _failure_message(result: RuleResult) -> str:
    more = len(result.findings) - 1
    return _line(result.findings[0]) + (f"; and {more} more" if more else "")


def junit_xml(result: CheckResult, *, seconds: float | None = None) -> str:
    """The result as JUnit XML: one ``<testcase>`` per rule, named by the rule's label.

    Args:
        result: What :func:`lowrank_audit.policy.check` returned.
        seconds: Wall time of the check (audit included), written as the suite's ``time``.
    """
    counts = {
        "tests": str(len(result.results)),
        "failures": str(result.count("failed")),
        "errors": "0",
        "skipped": str(result.count("skipped")),
    }
    timing = {"time": f"{seconds:.3f}"} if seconds is not None else {}
    suites = ET.Element("testsuites", {"name": "lowrank-audit check", **counts, **timing})
    suite = ET.SubElement(suites, "testsuite", {"name": f"lowrank-audit check {result.source}", **counts, **timing})
    properties = ET.SubElement(suite, "properties")
    for key, value in (("source", result.source), ("policy", result.policy), ("baseline", result.baseline)):
        if value is not None:
            ET.SubElement(properties, "property", name=key, value=value)
    for rule in result.results:
        case = ET.SubElement(suite, "testcase", classname=CLASSNAME, name=rule.rule)
        if rule.status == "skipped":
            ET.SubElement(case, "skipped", message=rule.skipped or "")
        elif rule.status == "failed":
            failure = ET.SubElement(case, "failure", message=_failure_message(rule), type="PolicyViolation")
            failure.text = "\n".join(_line(f) for f in rule.findings)
        counts = f"{plural(rule.checked, 'layer')} checked, {plural(len(rule.findings), 'finding')}"
        ET.SubElement(case, "system-out").text = counts
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _md(text: str) -> str:
    """Text safe in a Markdown table cell: emphasis, links, HTML and pipes escaped."""
    return re.sub(r"([\\`*_\[\]<>|#~])", r"\\\1", text)


def _code(text: str) -> str:
    """A code span for names and globs; a table cell still needs its pipes escaped."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def _summary_line(result: CheckResult) -> str:
    status = "passed" if result.passed else "failed"
    return f"## {_ICONS[status]} lowrank-audit check {status}: {result.headline()}"


def markdown(result: CheckResult, *, max_findings: int = MARKDOWN_FINDINGS) -> str:
    """The result as Markdown: a headline, one table row per rule, then the findings."""
    what = [f"**Source** {_code(result.source)}"]
    what += [f"**Baseline** {_code(result.baseline)}"] if result.baseline else []
    what += [f"**Policy** {_code(result.policy)}"]
    lines = [_summary_line(result), "", " · ".join(what), "", "| | rule | layers | findings |", "|---|---|--:|--:|"]
    for rule in result.results:
        checked, found = ("—", f"skipped: {_md(rule.skipped)}") if rule.skipped else (rule.checked, len(rule.findings))
        lines.append(f"| {_ICONS[rule.status]} | {_code(rule.rule)} | {checked} | {found} |")
    findings = result.findings
    if findings:
        lines += ["", "### Findings", "", "| rule | layer | value | limit | why |", "|---|---|--:|---|---|"]
        lines += [
            f"| {_code(f.rule)} | {_code(f.layer)} | {_md(f.shown)} | {_md(f.limit)} | {_md(f.message)} |"
            for f in findings[:max_findings]
        ]
        if len(findings) > max_findings:
            more = plural(len(findings) - max_findings, "more finding")
            lines += ["", f"… and {more}: the JUnit report lists every finding."]
    return "\n".join(lines) + "\n"


__all__ = ["CLASSNAME", "MARKDOWN_FINDINGS", "junit_xml", "markdown"]
