"""The rules of a check: each measures one thing on a spectrum report and returns its findings.

A rule is a frozen dataclass with a ``label`` (how results name it), what it ``needs``
besides the report (keys of :data:`NEEDS`), the report ``columns`` it reads, whether it may
be skipped when it cannot run (``unevaluable``), and an ``evaluate`` method taking the report
and the baseline report. :func:`blocker` says why a rule cannot run; ``evaluate`` is called
only when it can (it still reports a scope that matches nothing as skipped). Rows are
identified across reports by :func:`labels`: the tensor name, with ``[expert]`` for a
matrix of a 3-D tensor. :mod:`lowrank_audit.policy` reads rules from TOML and runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd

from lowrank_audit.metrics import rank_above

# Storing a merged update rounds it, and the rounding is full-rank noise. Measured on the
# sample base with a rank-16 update of 5 % of ||W||_F (64 x 64 and 128 x 64): s17 / s1 is
# 3e-7 stored in float32, 3e-3 in float16 and 2.4e-2 in bfloat16 (1e-1 for a 1 % update).
# For n x n matrices it should fall as 1/sqrt(n), 8x lower at n = 4096 (a random-matrix
# estimate, not measured here). A full fine-tune's update keeps most of its spectrum above
# 1e-2 (48 to 63 of 64 values on the sample pair). So 1e-2 tells the two apart in float32
# and float16; bfloat16 merges of small updates need a larger tolerance (README, "check").
DEFAULT_TOLERANCE = 1e-2
NO_VALUE = "—"
# What a rule can need besides the report, and the reason given when the check lacks it.
NEEDS = {"updates": "needs updates: --base BASE, or a LoRA adapter as SOURCE", "baseline": "needs --baseline REPORT"}
# Report kinds that are updates to a model: a fine-tune minus its base, and what a LoRA adapter applies.
UPDATE_KINDS = ("delta", "adapter")
# A rule that cannot run stops the check (exit 2), or, when its policy allows it, is skipped.
UNEVALUABLE = ("error", "skip")


@dataclass(frozen=True)
class Finding:
    """One layer breaking one rule."""

    rule: str
    layer: str
    value: float | None  # the measured figure; None when it could not be measured
    shown: str  # the value as displayed
    limit: str
    message: str


@dataclass(frozen=True)
class RuleResult:
    """A rule's outcome: layers checked and findings, or why it could not run (``skipped``)."""

    rule: str
    checked: int
    findings: tuple[Finding, ...] = ()
    skipped: str | None = None

    @property
    def status(self) -> str:
        """``passed``, ``failed`` or ``skipped``."""
        return "skipped" if self.skipped else "failed" if self.findings else "passed"


@dataclass(frozen=True)
class Scope:
    """The report rows a rule applies to: globs on tensor names and on roles (all when empty)."""

    layers: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    def mask(self, report: pd.DataFrame) -> pd.Series:
        keep = pd.Series(True, index=report.index)
        for globs, column in ((self.layers, "name"), (self.roles, "role")):
            if globs:
                keep &= report[column].fillna("").map(lambda v, g=globs: any(fnmatchcase(v, p) for p in g))
        return keep

    @property
    def columns(self) -> tuple[str, ...]:
        """The report columns the scope reads besides ``name``."""
        return ("role",) if self.roles else ()

    def describe(self) -> str:
        parts = [
            f"{key} {', '.join(globs)}" for key, globs in (("layers", self.layers), ("roles", self.roles)) if globs
        ]
        return f" on {'; '.join(parts)}" if parts else ""

    def no_match(self, where: str = "layer of the report") -> str:
        """Why a rule that selects nothing cannot run: a typo must not pass silently."""
        scope = self.describe().removeprefix(" on ")
        return f"{scope} match no {where}" if scope else f"no {where}"


class Rule(Protocol):
    @property
    def label(self) -> str: ...

    @property
    def needs(self) -> tuple[str, ...]: ...

    @property
    def columns(self) -> tuple[str, ...]: ...

    @property
    def unevaluable(self) -> str: ...

    def evaluate(self, report: pd.DataFrame, baseline: pd.DataFrame | None) -> RuleResult: ...


def unmet(rule: Rule, *, updates: bool, baseline: bool) -> str | None:
    """What the rule needs that the check will not have (known before any audit), or None.

    Args:
        rule: The rule.
        updates: The report holds updates (SOURCE - BASE).
        baseline: A baseline report is given.
    """
    have = {"updates": updates, "baseline": baseline}
    return next((NEEDS[need] for need in rule.needs if not have[need]), None)


def blocker(rule: Rule, report: pd.DataFrame, baseline: pd.DataFrame | None) -> str | None:
    """Why the rule cannot run on these reports (an unmet need, an absent column), or None."""
    updates = bool(report["kind"].isin(UPDATE_KINDS).any())
    if reason := unmet(rule, updates=updates, baseline=baseline is not None):
        return reason
    frames = [("the report", report)]
    if baseline is not None and "baseline" in rule.needs:
        frames.append(("the baseline", baseline))
    for where, frame in frames:
        absent = [column for column in rule.columns if column not in frame.columns]
        if absent:
            return f"column{'s' * (len(absent) > 1)} {', '.join(absent)} absent from {where}"
    return None


def labels(report: pd.DataFrame) -> list[str]:
    """``name``, or ``name[expert]`` for a matrix of a 3-D tensor: a row's identity across reports."""
    return [n if pd.isna(e) else f"{n}[{e}]" for n, e in zip(report["name"], report["expert"], strict=True)]


def _number(value: float) -> str:
    if isinstance(value, (int, np.integer)) or (
        math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15
    ):
        return f"{int(value)}"
    return f"{value:.4g}"


def _percent(share: float) -> str:
    return f"{share * 100:.3g} %" if math.isfinite(share) else "∞"


def _unknown(rule: str, layer: str, limit: str, row: dict[str, Any], column: str, where: str = "") -> Finding:
    """The finding for a figure the report leaves empty: the gate cannot vouch for it."""
    return Finding(rule, layer, None, NO_VALUE, limit, _why_empty(row, column) + where)


def _why_empty(row: dict[str, Any], column: str) -> str:
    """Why a report cell is null, with the fix."""
    if row.get("method") == "skipped":
        return f"{column} unknown: not decomposed (non-finite entries)"
    if row.get("method") == "randomized":
        return f"{column} unknown: only the top {row.get('k')} singular values computed; audit with --method exact"
    return f"{column} undefined for this matrix"


@dataclass(frozen=True)
class NonfiniteRule:
    """``forbid-nonfinite``: no matrix may hold NaN or Inf."""

    label: str = "forbid-nonfinite"
    needs: ClassVar[tuple[str, ...]] = ()
    columns: ClassVar[tuple[str, ...]] = ("nonfinite",)
    unevaluable: ClassVar[str] = "error"  # on in every policy unless turned off

    def evaluate(self, report: pd.DataFrame, baseline: pd.DataFrame | None) -> RuleResult:
        bad = report["nonfinite"] > 0
        findings = tuple(
            Finding(self.label, layer, float(n), f"{n:,}", "0", f"{n:,} NaN/Inf entries")
            for layer, n in zip(labels(report[bad]), report.loc[bad, "nonfinite"], strict=True)
        )
        return RuleResult(self.label, len(report), findings)


@dataclass(frozen=True)
class BoundRule:
    """``[[rule]]``: a report column (over min(rows, cols) when ``relative``) within [min, max]."""

    column: str
    min: float | None = None
    max: float | None = None
    relative: bool = False
    missing: str = "fail"
    scope: Scope = Scope()
    name: str | None = None
    unevaluable: str = "error"
    needs: ClassVar[tuple[str, ...]] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column, *(("rows", "cols") if self.relative else ()), *self.scope.columns)

    @property
    def figure(self) -> str:
        return f"{self.column}/min(rows,cols)" if self.relative else self.column

    @property
    def limit(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{_number(self.min)} … {_number(self.max)}"
        return f"≥ {_number(self.min)}" if self.min is not None else f"≤ {_number(self.max)}"  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        return self.name or f"{self.figure} {self.limit}{self.scope.describe()}"

    def evaluate(self, report: pd.DataFrame, baseline: pd.DataFrame | None) -> RuleResult:
        rows = report[self.scope.mask(report)]
        if rows.empty:
            return RuleResult(self.label, 0, skipped=self.scope.no_match())
        findings = []
        for layer, row in zip(labels(rows), rows.to_dict("records"), strict=True):
            value = row[self.column]
            if pd.isna(value):
                if self.missing == "fail":
                    findings.append(_unknown(self.label, layer, self.limit, row, self.column))
                continue
            value = value / min(row["rows"], row["cols"]) if self.relative else value
            low, high = self.min is not None and value < self.min, self.max is not None and value > self.max
            if low or high:
                bound = f"below the minimum {_number(self.min)}" if low else f"above the maximum {_number(self.max)}"  # type: ignore[arg-type]
                message = f"{self.figure} = {_number(value)} is {bound}"
                findings.append(Finding(self.label, layer, float(value), _number(value), self.limit, message))
        return RuleResult(self.label, len(rows), tuple(findings))


@dataclass(frozen=True)
class AdapterRankRule:
    """``[[adapter-rank]]``: every update (a delta, or a LoRA adapter's module) has at most ``rank``
    singular values above ``tolerance * s1``."""

    rank: int
    tolerance: float = DEFAULT_TOLERANCE
    scope: Scope = Scope()
    name: str | None = None
    unevaluable: str = "error"
    needs: ClassVar[tuple[str, ...]] = ("updates",)

    @property
    def columns(self) -> tuple[str, ...]:
        return ("singular_values", "spectral_norm", "method", *self.scope.columns)

    @property
    def label(self) -> str:
        return self.name or f"adapter rank ≤ {self.rank} at {self.tolerance:g}·σ₁{self.scope.describe()}"

    def evaluate(self, report: pd.DataFrame, baseline: pd.DataFrame | None) -> RuleResult:
        rows = report[report["kind"].isin(UPDATE_KINDS) & self.scope.mask(report)]
        if rows.empty:
            return RuleResult(self.label, 0, skipped=self.scope.no_match("update"))
        limit, findings = f"≤ {self.rank}", []
        for layer, row in zip(labels(rows), rows.to_dict("records"), strict=True):
            s = row["singular_values"]
            if s is None or pd.isna(row["spectral_norm"]):
                findings.append(_unknown(self.label, layer, limit, row, "rank"))
                continue
            s = np.asarray(s, dtype=np.float64)
            rank = rank_above(s, self.tolerance)
            # A truncated spectrum whose every value is above the tolerance only bounds the rank below.
            known = row["method"] == "exact" or rank < len(s)
            if rank > self.rank:
                shown = str(rank) if known else f"≥ {rank}"
                message = f"{shown} singular values above {self.tolerance:g}·σ₁; the claim is {self.rank}"
                findings.append(Finding(self.label, layer, float(rank), shown, limit, message))
            elif not known:
                findings.append(_unknown(self.label, layer, limit, row, "rank"))
        return RuleResult(self.label, len(rows), tuple(findings))


def relative_change(old: float, new: float) -> float:
    """``|new - old| / |old|``: 0 when both are 0, infinite when only ``old`` is."""
    if old == 0:
        return 0.0 if new == 0 else math.inf
    return abs(new - old) / abs(old)


@dataclass(frozen=True)
class DriftRule:
    """``[[drift]]``: a column's relative change against the baseline report is at most ``max``."""

    column: str
    max: float
    missing: str = "fail"
    scope: Scope = Scope()
    name: str | None = None
    unevaluable: str = "error"
    needs: ClassVar[tuple[str, ...]] = ("baseline",)

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column, *self.scope.columns)

    @property
    def label(self) -> str:
        return self.name or f"{self.column} drift ≤ {_percent(self.max)}{self.scope.describe()}"

    def evaluate(self, report: pd.DataFrame, baseline: pd.DataFrame | None) -> RuleResult:
        if baseline is None:  # check() never gets here (see blocker); a direct caller might
            return RuleResult(self.label, 0, skipped=NEEDS["baseline"])
        before = dict(zip(labels(baseline), baseline.to_dict("records"), strict=True))
        rows = report[self.scope.mask(report)]
        pairs = [
            (layer, row) for layer, row in zip(labels(rows), rows.to_dict("records"), strict=True) if layer in before
        ]
        if not pairs:
            return RuleResult(self.label, 0, skipped=self.scope.no_match("layer in both reports"))
        limit, findings = f"≤ {_percent(self.max)}", []
        for layer, row in pairs:
            new, old = row[self.column], before[layer][self.column]
            if pd.isna(new) or pd.isna(old):
                side, which = (row, "source") if pd.isna(new) else (before[layer], "baseline")
                if self.missing == "fail":
                    findings.append(_unknown(self.label, layer, limit, side, self.column, f" (in the {which})"))
                continue
            change = relative_change(float(old), float(new))
            if change > self.max:
                message = f"{self.column} {_number(old)} → {_number(new)} ({_percent(change)} change)"
                findings.append(Finding(self.label, layer, change, _percent(change), limit, message))
        return RuleResult(self.label, len(pairs), tuple(findings))


@dataclass(frozen=True)
class MembershipRule:
    """``forbid-added-layers`` / ``forbid-removed-layers``: the same matrices as the baseline."""

    added: bool
    needs: ClassVar[tuple[str, ...]] = ("baseline",)
    columns: ClassVar[tuple[str, ...]] = ()
    # On in every policy, the built-in defaults included: without a baseline there is nothing
    # to compare, and a check without --baseline must not stop on rules the user never wrote.
    unevaluable: ClassVar[str] = "skip"

    @property
    def label(self) -> str:
        return f"forbid-{'added' if self.added else 'removed'}-layers"

    def evaluate(self, report: pd.DataFrame, baseline: pd.DataFrame | None) -> RuleResult:
        if baseline is None:  # check() never gets here (see blocker); a direct caller might
            return RuleResult(self.label, 0, skipped=NEEDS["baseline"])
        new, old = (labels(report), labels(baseline)) if self.added else (labels(baseline), labels(report))
        known = set(old)
        word, where = ("added", "not in the baseline") if self.added else ("removed", "in the baseline only")
        findings = tuple(Finding(self.label, layer, None, word, "none", where) for layer in new if layer not in known)
        return RuleResult(self.label, len(new), findings)


__all__ = [
    "DEFAULT_TOLERANCE",
    "NEEDS",
    "UPDATE_KINDS",
    "UNEVALUABLE",
    "AdapterRankRule",
    "BoundRule",
    "DriftRule",
    "Finding",
    "MembershipRule",
    "NonfiniteRule",
    "Rule",
    "RuleResult",
    "Scope",
    "blocker",
    "labels",
    "relative_change",
    "unmet",
]
