"""The dependency audit's verdict (reliability/audit.py), offline: pip-audit's JSON and PyPI's project JSON are
stand-ins here. reliability/audit.sh runs the real thing (network)."""

import subprocess
import sys
from pathlib import Path

import pytest

from reliability import audit

REPO = Path(__file__).resolve().parents[2]


def pip_audit(*deps):
    """pip-audit's --format json: looked-up dependencies have a version and vulns, the others a skip_reason."""
    return {"dependencies": list(deps), "fixes": []}


def found(name, version, *vulns):
    return {
        "name": name,
        "version": version,
        "vulns": [{"id": v, "aliases": [f"CVE-{v}"], "fix_versions": ["9.9"], "description": "bad"} for v in vulns],
    }


def skipped(name, version):
    return {"name": name, "skip_reason": f"Dependency not found on PyPI and could not be audited: {name} ({version})"}


def latest(table):
    """A stand-in for PyPI's project JSON: name -> (latest version, advisories of the latest release)."""

    def lookup(name):
        answer = table[name]
        if isinstance(answer, Exception):
            raise answer
        version, ids = answer
        return version, [audit.Vuln(i, [f"CVE-{i}"], [], "bad") for i in ids]

    return lookup


def entry(name, version, verdict="not affected", advisories=(), why="because"):
    return {"name": name, "version": version, "verdict": verdict, "advisories": list(advisories), "why": why}


def run(packages, reports=(), table=None, entries=()):
    result, stale = audit.decide(packages, audit.from_pip_audit(list(reports)), latest(table or {}), list(entries))
    return {p.name: p for p in result}, stale, audit.verdict(result)


def test_pip_audit_results_are_used_and_an_unjustified_vulnerability_fails():
    packages, _, status = run([("a", "1.0"), ("b", "2.0")], [pip_audit(found("a", "1.0"), found("b", "2.0", "X-1"))])
    assert packages["a"].how == packages["b"].how == "pip-audit"
    assert [v.id for v in packages["b"].vulns] == ["X-1"] and status == 1


def test_an_accepted_advisory_is_justified_by_id_or_alias_and_only_for_that_version():
    reports = [pip_audit(found("b", "2.0", "X-1", "X-2"))]
    packages, _, status = run([("b", "2.0")], reports, entries=[entry("b", "2.0", "accepted", ["X-1", "CVE-X-2"])])
    assert set(packages["b"].justified) == {"X-1", "X-2"} and status == 0
    packages, _, status = run([("b", "2.0")], reports, entries=[entry("b", "2.0", "accepted", ["X-1"])])
    assert set(packages["b"].justified) == {"X-1"} and status == 1
    _, stale, status = run([("b", "2.0")], reports, entries=[entry("b", "1.9", "accepted", ["X-1", "X-2"])])
    assert status == 1 and [e["version"] for e in stale] == ["1.9"]


def test_what_pip_audit_cannot_look_up_falls_back_to_the_latest_release_json():
    packages, _, status = run(
        [("a", "1.0"), ("b", "2.0")],
        [pip_audit(skipped("a", "1.0"), skipped("b", "2.0"))],
        {"a": ("1.0", []), "b": ("2.0", ["Y-1"])},
    )
    assert packages["a"].how == packages["b"].how == "pypi-json"
    assert [v.id for v in packages["b"].vulns] == ["Y-1"] and status == 1


def test_an_older_release_is_unaudited_unless_reviewed_by_hand_at_exactly_that_version():
    table = {"torch": ("2.15.0", [])}
    packages, _, status = run([("torch", "2.13.0+cpu")], table=table)
    assert packages["torch"].how == "unaudited" and "latest 2.15.0" in packages["torch"].note and status == 2
    packages, stale, status = run([("torch", "2.13.0+cpu")], table=table, entries=[entry("torch", "2.13.0")])
    assert packages["torch"].how == "review" and not stale and status == 0  # the local label is not the release
    packages, stale, status = run([("torch", "2.14.0")], table=table, entries=[entry("torch", "2.13.0")])
    assert packages["torch"].how == "unaudited" and stale and status == 2


def test_a_lookup_that_fails_leaves_the_package_unaudited():
    packages, _, status = run([("a", "1.0")], table={"a": OSError("no route")})
    assert packages["a"].how == "unaudited" and "OSError" in packages["a"].note and status == 2


def test_names_are_compared_canonically():
    packages, _, status = run(
        [("Python_Dateutil", "2.9.0.post0")], [pip_audit(found("python-dateutil", "2.9.0.post0"))]
    )
    assert packages["python-dateutil"].how == "pip-audit" and status == 0


def test_the_committed_review_is_valid_and_current_for_the_pins():
    """Each entry has a verdict, the advisories it weighed and a reason; an entry for a package pyproject.toml
    pins exactly names the pinned version (a bump needs a new review, not a stale one)."""
    data, entries = audit.load_review()
    assert data["reviewed"] and data["source"] and entries
    pinned = {audit.canonical(n): v for n, _, v in (p.partition("==") for p in audit.pins())}
    for e in entries:
        assert e["why"].strip() and isinstance(e["advisories"], list)
        if audit.canonical(e["name"]) in pinned:
            assert e["version"] == pinned[audit.canonical(e["name"])], e["name"]


def test_a_review_entry_without_a_verdict_is_refused(tmp_path):
    path = tmp_path / "review.toml"
    path.write_text('reviewed = "2026-11-29"\n[[package]]\nname = "a"\nversion = "1"\nadvisories = []\nwhy = "x"\n')
    with pytest.raises(ValueError, match="verdict"):
        audit.load_review(path)


def test_one_advisory_under_two_ids_counts_once():
    dep = {
        "name": "s",
        "version": "2.1.0",
        "vulns": [
            {"id": "GHSA-1", "aliases": ["CVE-1", "PYSEC-1"], "fix_versions": [], "description": "pickle"},
            {"id": "PYSEC-1", "aliases": ["CVE-1", "GHSA-1"], "fix_versions": [], "description": "pickle"},
        ],
    }
    packages, _, status = run([("s", "2.1.0")], [pip_audit(dep)], entries=[entry("s", "2.1.0", "accepted", ["CVE-1"])])
    assert [v.id for v in packages["s"].vulns] == ["GHSA-1"] and status == 0


def test_a_not_affected_review_justifies_only_the_advisories_it_names():
    """A reviewed false positive (torch's records that lost their upper bound) passes; any other advisory a
    tool reports for that version does not."""
    review = [entry("a", "1.0", advisories=["X-1"])]
    for reports, table in (([pip_audit(found("a", "1.0", "X-1"))], {}), ([], {"a": ("1.0", ["X-1"])})):
        packages, _, status = run([("a", "1.0")], reports, table, entries=review)
        assert [v.id for v in packages["a"].vulns] == ["X-1"] and "not affected" in packages["a"].justified["X-1"]
        assert status == 0
    for reports, table in (([pip_audit(found("a", "1.0", "X-1", "X-2"))], {}), ([], {"a": ("1.0", ["X-1", "X-2"])})):
        packages, _, status = run([("a", "1.0")], reports, table, entries=review)
        assert set(packages["a"].justified) == {"X-1"} and status == 1


def test_an_accepted_entry_justifies_but_is_no_review():
    """sqlitedict's entry must not turn into "reviewed, 0 vulnerabilities" when PyPI cannot be reached or a
    new release leaves the installed one behind."""
    accepted = [entry("sqlitedict", "2.1.0", "accepted", ["CVE-2024-35515"])]
    for answer in (OSError("no route"), ("2.2.0", [])):
        packages, _, status = run([("sqlitedict", "2.1.0")], table={"sqlitedict": answer}, entries=accepted)
        assert packages["sqlitedict"].how == "unaudited" and status == 2


def test_review_names_and_versions_are_normalised():
    packages, stale, status = run(
        [("python-dateutil", "2.9.0.post0")],
        table={"python-dateutil": ("4.0.0", [])},
        entries=[entry("Python_Dateutil", "2.9.0-post0")],
    )
    assert packages["python-dateutil"].how == "review" and not stale and status == 0
    packages, _, _ = run([("a", "1.0.0")], table={"a": ("1.0", [])})
    assert packages["a"].how == "pypi-json"


def test_one_review_entry_per_name_and_version(tmp_path):
    path = tmp_path / "review.toml"
    one = '[[package]]\nname = "{}"\nversion = "1.0"\nverdict = "not affected"\nadvisories = []\nwhy = "x"\n'
    path.write_text('reviewed = "2026-11-29"\n' + one.format("a_b") + one.format("A-B"))
    with pytest.raises(ValueError, match="more than one"):
        audit.load_review(path)


def test_an_audit_that_cannot_run_exits_2_not_1(tmp_path):
    """1 means "vulnerable": a missing or unreadable pip-audit result must not say that, nor pass."""
    (tmp_path / "requirements.txt").write_text("a==1.0\n")
    (tmp_path / "pinned.json").write_text("{not json")
    done = subprocess.run(
        [sys.executable, str(REPO / "reliability" / "audit.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "JSONDecodeError" in done.stderr
