"""The CI gate: a TOML policy of rules, checked against a spectrum report, giving findings.

A policy is the ``[tool.lowrank-audit.check]`` table of the nearest ``pyproject.toml`` that
has one (searched from the working directory upwards, as ruff does), or a file given
explicitly. :func:`check` evaluates it on a report, and on a baseline report for drift, and
returns a :class:`CheckResult`: one :class:`RuleResult` per rule with its :class:`Finding`
objects. The library never decides exit codes; the CLI maps a failed result to 1.

A check never passes on a rule it could not evaluate: a rule that cannot run (it needs
``--base`` or ``--baseline``, a column is absent from a report, its globs match nothing)
raises :class:`~lowrank_audit.errors.RuleNotEvaluable`, unless its table says
``unevaluable = "skip"``; then it is reported as skipped, with the reason. The built-in
``forbid-added-layers`` and ``forbid-removed-layers`` rules, on in every policy, are
skipped without a baseline.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from lowrank_audit.errors import OptionError, PolicyError, RuleNotEvaluable
from lowrank_audit.formats.report import COLUMNS, METADATA_KEY
from lowrank_audit.rules import (
    DEFAULT_TOLERANCE,
    UNEVALUABLE,
    AdapterRankRule,
    BoundRule,
    DriftRule,
    Finding,
    MembershipRule,
    NonfiniteRule,
    Rule,
    RuleResult,
    Scope,
    blocker,
    unmet,
)
from lowrank_audit.wording import plural

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TABLE = ("tool", "lowrank-audit", "check")
NUMERIC_COLUMNS = tuple(name for name, dtype, _ in COLUMNS if pa.types.is_integer(dtype) or pa.types.is_floating(dtype))
# Figures that count directions: divided by min(rows, cols) they compare across shapes.
RANK_COLUMNS = ("stable_rank", "effective_rank", "numerical_rank", "k90", "k95", "k99", "signal_rank", "k")
# Columns every rule reads to identify rows (rules.labels) and to tell weights from updates.
IDENTITY_COLUMNS = ("name", "expert", "kind")


@dataclass(frozen=True)
class CheckResult:
    """Every rule's outcome, with what was checked against what."""

    results: tuple[RuleResult, ...]
    source: str
    policy: str
    baseline: str | None = None

    @property
    def passed(self) -> bool:
        """True when no rule failed (a rule is skipped only where its policy allows it)."""
        return not any(r.status == "failed" for r in self.results)

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(f for r in self.results for f in r.findings)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    def headline(self) -> str:
        """``3 of 5 rules hold, 2 skipped`` (skipped ones do not hold), or ``1 of 5 rules broken, 1 finding``."""
        rules, skipped = plural(len(self.results), "rule"), self.count("skipped")
        tail = f", {skipped} skipped" if skipped else ""
        if self.passed:
            return f"{len(self.results) - skipped} of {rules} {'hold' if rules.endswith('s') else 'holds'}{tail}"
        return f"{self.count('failed')} of {rules} broken, {plural(len(self.findings), 'finding')}{tail}"


@dataclass(frozen=True)
class Policy:
    """The rules of a check, in the order they are reported, and where they were read from."""

    rules: tuple[Rule, ...]
    source: str = "built-in defaults (no [tool.lowrank-audit.check] found)"


def _provenance_path(report: pd.DataFrame, fallback: str) -> str:
    inputs = report.attrs.get(METADATA_KEY, {}).get("inputs", {})
    path = inputs.get("checkpoint", {}).get("path", fallback)
    return f"{path} - {inputs['base']['path']}" if "base" in inputs else path


def _refuse(blocked: list[tuple[str, str]]) -> None:
    """Raise the one error for every rule that cannot run and may not be skipped."""
    if not blocked:
        return
    fix = 'a gate never passes a rule it could not evaluate (to skip it instead, set unevaluable = "skip" in its table)'
    if len(blocked) == 1:
        ((rule, reason),) = blocked
        raise RuleNotEvaluable(f"rule '{rule}' cannot run: {reason}; {fix}", tuple(blocked))
    rules = "; ".join(f"'{rule}': {reason}" for rule, reason in blocked)
    raise RuleNotEvaluable(f"{len(blocked)} rules cannot run: {rules}; {fix}", tuple(blocked))


def require_inputs(policy: Policy, *, updates: bool, baseline: bool) -> None:
    """Refuse, before any audit, a check whose rules need an input it will not have.

    The same refusal as :func:`check`'s, known early: a rule needing ``--base`` when the
    report will hold weights, or ``--baseline`` when none is given.

    Args:
        policy: The rules.
        updates: The report will hold updates (a checkpoint audited with a base).
        baseline: A baseline report will be given.

    Raises:
        RuleNotEvaluable: A rule needs what is missing and its policy does not allow skipping it.
    """
    _refuse([
        (rule.label, reason)
        for rule in policy.rules
        if rule.unevaluable != "skip" and (reason := unmet(rule, updates=updates, baseline=baseline))
    ])  # fmt: skip


def _identify(frame: pd.DataFrame, what: str) -> None:
    absent = [column for column in IDENTITY_COLUMNS if column not in frame.columns]
    if absent:
        raise OptionError(f"{what} has no column {', '.join(absent)}; pass a spectrum report (lowrank_audit.spectrum)")


def check(report: pd.DataFrame, policy: Policy | None = None, *, baseline: pd.DataFrame | None = None) -> CheckResult:
    """Evaluate a policy's rules on a spectrum report (and a baseline report, for drift).

    Args:
        report: A spectrum report (see :func:`lowrank_audit.spectrum`).
        policy: The rules; the defaults (``forbid-nonfinite`` and, with a baseline, no
            added or removed layers) when None.
        baseline: An earlier report of the same kind, for drift and membership rules.
            Without it, drift rules cannot run, and membership rules are skipped.

    Returns:
        One :class:`RuleResult` per rule; ``result.passed`` is False when any failed. A rule
        that could not run is in it, as skipped with the reason, only where its policy
        allows it (``unevaluable = "skip"``; always for membership rules).

    Raises:
        RuleNotEvaluable: Some rule cannot run (it needs updates or a baseline, a column it
            reads is absent from a report, its globs match nothing) and may not be skipped;
            the message names each such rule and what it lacks.
        OptionError: ``report`` and ``baseline`` audit different kinds (weights vs updates),
            or one of them lacks the columns that identify rows.

    Example:
        >>> result = check(report, load_policy("gate.toml"), baseline=read_report("last.parquet"))
        >>> result.passed, result.headline()
        (False, '1 of 5 rules broken, 3 findings')
    """
    policy = policy or parse_policy({})
    _identify(report, "the report")
    if baseline is not None:
        _identify(baseline, "the baseline")
        new, old = ("/".join(sorted(set(frame["kind"].dropna()))) for frame in (report, baseline))
        if new != old:
            raise OptionError(f"the baseline holds {old} rows but the source {new} rows; compare like with like")
    results, blocked = [], []
    for rule in policy.rules:
        reason = blocker(rule, report, baseline)
        result = RuleResult(rule.label, 0, skipped=reason) if reason else rule.evaluate(report, baseline)
        if result.skipped and rule.unevaluable != "skip":
            blocked.append((rule.label, result.skipped))
        results.append(result)
    _refuse(blocked)
    base = _provenance_path(baseline, "baseline report") if baseline is not None else None
    return CheckResult(tuple(results), _provenance_path(report, "report"), policy.source, base)


_TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
_KINDS: dict[str, Callable[[Any], bool]] = {
    "a boolean": lambda v: isinstance(v, bool),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a finite number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "a string": lambda v: isinstance(v, str),
}
_REQUIRED = object()


def _glob_problem(glob: str) -> str | None:
    """Why a glob is malformed: empty, or a ``[`` set never closed (fnmatch would match it literally)."""
    if not glob:
        return "an empty glob matches nothing"
    i = 0
    while i < len(glob):
        if glob[i] == "[":
            j = i + 1 + (glob[i + 1 : i + 2] == "!")
            j += glob[j : j + 1] == "]"  # a ']' first in a set is literal
            close = glob.find("]", j)
            if close < 0:
                return f"'[' at position {i} of {glob!r} is never closed"
            i = close
        i += 1
    return None


class _Table:
    """A policy table being read: its keys declared up front, then typed access by key."""

    def __init__(self, data: dict[str, Any], where: str, file: str, keys: tuple[str, ...]) -> None:
        self.data, self.where, self.file = data, where, file
        for key in data:
            if key not in keys:  # before anything else, so a typo is named as such
                raise self.fail(key, f"unknown key; expected one of: {', '.join(sorted(keys))}")

    def fail(self, key: str, problem: str) -> PolicyError:
        path = f"{self.where}.{key}" if self.where else key
        return PolicyError(f"{self.file}: {path}: {problem}")

    def get(self, key: str, kind: str, default: Any = _REQUIRED) -> Any:
        if key not in self.data:
            if default is _REQUIRED:
                raise self.fail(key, f"missing; it must be {kind}")
            return default
        value = self.data[key]
        if not _KINDS[kind](value):
            toml_type = _TOML_TYPES.get(type(value), type(value).__name__)
            raise self.fail(key, f"must be {kind} but got {value!r} ({toml_type})")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = _REQUIRED) -> Any:
        value = self.get(key, "a string", default)
        if value is not None and value not in options:
            raise self.fail(key, f"{value!r} is not one of: {', '.join(options)}")
        return value

    def globs(self, key: str) -> tuple[str, ...]:
        value = self.data.get(key, [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
            raise self.fail(key, f"must be a glob or an array of globs but got {value!r}")
        for glob in value:
            if problem := _glob_problem(glob):
                raise self.fail(key, f"bad glob: {problem}")
        return tuple(value)

    def scope(self) -> Scope:
        return Scope(self.globs("layers"), self.globs("roles"))

    def tables(self, key: str, keys: tuple[str, ...]) -> list[_Table]:
        """An array of tables; a single table (one pair of brackets) counts as an array of one."""
        value = self.data.get(key, [])
        value = [value] if isinstance(value, dict) else value
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise self.fail(key, f"must be an array of tables ([[{key}]]) but got {value!r}")
        prefix = f"{self.where}.{key}" if self.where else key
        return [_Table(t, f"{prefix}[{i}]", self.file, keys) for i, t in enumerate(value, start=1)]


_SCOPE_KEYS = ("layers", "roles", "name")
_KEYS = {
    "check": ("forbid-nonfinite", "rule", "adapter-rank", "drift", "forbid-added-layers", "forbid-removed-layers"),
    "rule": ("column", "min", "max", "relative", "missing", "unevaluable", *_SCOPE_KEYS),
    "adapter-rank": ("rank", "tolerance", "unevaluable", *_SCOPE_KEYS),
    "drift": ("column", "max", "missing", "unevaluable", *_SCOPE_KEYS),
}


def _unevaluable(t: _Table) -> str:
    """``unevaluable``: "error" (the default: a rule that cannot run stops the check) or "skip"."""
    return t.choice("unevaluable", UNEVALUABLE, "error")


def _bound_rule(t: _Table) -> BoundRule:
    column = t.choice("column", NUMERIC_COLUMNS)
    low, high = t.get("min", "a finite number", None), t.get("max", "a finite number", None)
    if low is None and high is None:
        raise t.fail("max", "missing; a rule needs min, max or both")
    if low is not None and high is not None and low > high:
        raise t.fail("min", f"{low} is above max {high}")
    relative = t.get("relative", "a boolean", False)
    if relative and column not in RANK_COLUMNS:
        raise t.fail("relative", f"applies to rank columns ({', '.join(RANK_COLUMNS)}), not {column}")
    missing = t.choice("missing", ("fail", "skip"), "fail")
    return BoundRule(column, low, high, relative, missing, t.scope(), t.get("name", "a string", None), _unevaluable(t))


def _adapter_rank_rule(t: _Table) -> AdapterRankRule:
    rank = t.get("rank", "an integer")
    if rank < 0:
        raise t.fail("rank", f"must be at least 0 but got {rank}")
    tolerance = t.get("tolerance", "a finite number", DEFAULT_TOLERANCE)
    if not 0 < tolerance < 1:
        raise t.fail("tolerance", f"must be between 0 and 1 (a share of sigma_1) but got {tolerance}")
    return AdapterRankRule(rank, float(tolerance), t.scope(), t.get("name", "a string", None), _unevaluable(t))


def _drift_rule(t: _Table) -> DriftRule:
    column = t.choice("column", NUMERIC_COLUMNS)
    limit = t.get("max", "a finite number")
    if limit < 0:
        raise t.fail("max", f"must be at least 0 (a relative change, 0.05 for 5 %) but got {limit}")
    missing = t.choice("missing", ("fail", "skip"), "fail")
    return DriftRule(column, float(limit), missing, t.scope(), t.get("name", "a string", None), _unevaluable(t))


def parse_policy(data: dict[str, Any], *, file: str = "policy", where: str = "", source: str | None = None) -> Policy:
    """A policy from the contents of a check table (see the README for every key).

    Args:
        data: The table, as :mod:`tomllib` reads it.
        file: The file named in errors.
        where: The table's key path in that file, prefixed to keys in errors.
        source: How the policy is described in results; the defaults' description when None.

    Raises:
        PolicyError: An unknown key, a value of the wrong type or out of range, or a bad glob.
    """
    t = _Table(data, where, file, _KEYS["check"])
    rules: list[Rule] = [NonfiniteRule()] if t.get("forbid-nonfinite", "a boolean", True) else []
    rules += [_bound_rule(r) for r in t.tables("rule", _KEYS["rule"])]
    rules += [_adapter_rank_rule(r) for r in t.tables("adapter-rank", _KEYS["adapter-rank"])]
    rules += [_drift_rule(r) for r in t.tables("drift", _KEYS["drift"])]
    rules += [MembershipRule(added) for added in (True, False)
              if t.get(f"forbid-{'added' if added else 'removed'}-layers", "a boolean", True)]  # fmt: skip
    return Policy(tuple(rules), source) if source else Policy(tuple(rules))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from exc


def _check_table(data: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """``data["tool"]["lowrank-audit"]["check"]``, or None when absent; not a table is an error."""
    for depth, key in enumerate(TABLE):
        if key not in data:
            return None
        data = data[key]
        if not isinstance(data, dict):
            raise PolicyError(f"{path}: {'.'.join(TABLE[: depth + 1])}: must be a table")
    return data


def load_policy(path: str | Path | None = None, *, start: str | Path | None = None) -> Policy:
    """Read a check policy from ``path``, or find one from ``start`` (the working directory) up.

    A file with a ``[tool]`` table (a ``pyproject.toml``) is read from its
    ``[tool.lowrank-audit.check]`` table; any other file holds the check keys at its top
    level. Searching, the nearest ``pyproject.toml`` with that table wins; with none, the
    built-in defaults apply.

    Raises:
        PolicyError: The file is missing, is not TOML, lacks the table, or is malformed.
    """
    if path is not None:
        path = Path(path)
        data = _read_toml(path)
        if "tool" not in data:
            return parse_policy(data, file=str(path), source=str(path))
        table = _check_table(data, path)
        if table is None:
            raise PolicyError(f"{path}: has a [tool] table but no [tool.lowrank-audit.check]")
        return parse_policy(table, file=str(path), where=".".join(TABLE), source=f"{path} [{'.'.join(TABLE)}]")
    folder = Path(start or Path.cwd()).resolve()
    for candidate in (d / "pyproject.toml" for d in (folder, *folder.parents)):
        if candidate.is_file() and (table := _check_table(_read_toml(candidate), candidate)) is not None:
            return parse_policy(
                table, file=str(candidate), where=".".join(TABLE), source=f"{candidate} [{'.'.join(TABLE)}]"
            )
    return parse_policy({})


__all__ = ["NUMERIC_COLUMNS", "RANK_COLUMNS", "TABLE", "CheckResult", "Policy", "check", "load_policy",
           "parse_policy", "require_inputs"]  # fmt: skip
