"""The verdict of reliability/audit.sh: reads pip-audit's JSON for the pins and the .venv, fills what pip-audit
could not look up, applies the hand review in reliability/audit-review.toml, prints the summary.

    python reliability/audit.py --pins FILE  # writes the exact pins of pyproject.toml to FILE (audit.sh, first)
    python reliability/audit.py OUT_DIR      # OUT_DIR has requirements.txt, pinned.json, venv.json (audit.sh)

Every package (each exact pin of pyproject.toml and each distribution installed in the running interpreter's
environment, the project itself aside) ends in one of these states:

- audited by pip-audit (OSV / PyPI's per-release advisories);
- audited by PyPI's project JSON, when pip-audit could not look it up and the installed version is the latest
  release: that JSON lists the advisories of the latest release only;
- reviewed by hand: a `not affected` entry of audit-review.toml for exactly this name and version, made
  against an advisory database and dated; a version bump makes the entry stale, and the package unaudited
  again;
- unaudited.

Each known vulnerability that pip-audit or PyPI's JSON reports is either justified or not. Justified: the
entry for that name and version names the advisory (id or alias), as `accepted` (kept, with the reason) or
as `not affected` (the review found that its data is wrong for this version, e.g. a range that lost its
upper bound). An advisory the entry does not name is never justified, and an `accepted` entry never counts
as a review. One entry per name and version. Exit status: 1 with an unjustified
vulnerability, else 2 while any package is unaudited (or when the audit itself fails), else 0.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
import tomllib
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

REVIEW = Path(__file__).with_name("audit-review.toml")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PROJECT = "gpt2-serve"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """2.13.0+cpu -> 2.13.0: advisories are about the public release."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version


def same(a: str, b: str) -> bool:
    """The same release under PEP 440 (1.0 == 1.0.0, 2.9.0-post0 == 2.9.0.post0; local labels aside)."""
    try:
        return Version(public(a)) == Version(public(b))
    except InvalidVersion:
        return a == b


@dataclass
class Vuln:
    id: str
    aliases: list[str]
    fixed_in: list[str]
    text: str

    def names(self) -> set[str]:
        return {self.id, *self.aliases}


@dataclass
class Package:
    name: str
    version: str
    how: str = "unaudited"  # pip-audit | pypi-json | review | unaudited
    note: str = ""
    vulns: list[Vuln] = field(default_factory=list)
    justified: dict[str, str] = field(default_factory=dict)  # vuln id -> why


def unique(vulns: list[Vuln]) -> list[Vuln]:
    """One entry per advisory: databases list the same one under several ids (GHSA-..., PYSEC-...)."""
    kept = []
    for v in vulns:
        if not any(v.names() & k.names() for k in kept):
            kept.append(v)
    return kept


def load_review(path: Path = REVIEW) -> tuple[dict, list[dict]]:
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    entries = data.get("package", [])
    seen = set()
    for entry in entries:
        if entry.get("verdict") not in ("not affected", "accepted"):
            raise ValueError(f"{path}: {entry.get('name')}: verdict must be 'not affected' or 'accepted'")
        for key in ("name", "version", "advisories", "why"):
            if key not in entry:
                raise ValueError(f"{path}: {entry.get('name')}: missing {key!r}")
        name = canonical(entry["name"])
        if any(n == name and same(v, entry["version"]) for n, v in seen):
            raise ValueError(f"{path}: {entry['name']} {entry['version']}: more than one entry")
        seen.add((name, entry["version"]))
    return data, entries


def from_pip_audit(reports: list[dict]) -> dict[tuple[str, str], list[Vuln]]:
    """(name, public version) -> vulns, for each package pip-audit did look up."""
    looked_up = {}
    for report in reports:
        for dep in report.get("dependencies", []):
            if "skip_reason" in dep or "version" not in dep:
                continue
            looked_up[(canonical(dep["name"]), public(dep["version"]))] = unique(
                [
                    Vuln(v["id"], v.get("aliases", []), v.get("fix_versions", []), v.get("description", ""))
                    for v in dep.get("vulns", [])
                ]
            )
    return looked_up


def pypi_project(name: str) -> tuple[str, list[Vuln]]:
    """The latest release on PyPI and its advisories (PyPI's project JSON)."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=30) as response:
        data = json.load(response)
    vulns = [
        Vuln(v["id"], v.get("aliases") or [], v.get("fixed_in") or [], v.get("summary") or v.get("details") or "")
        for v in data.get("vulnerabilities", [])
        if not v.get("withdrawn")
    ]
    return data["info"]["version"], unique(vulns)


def decide(packages: list[tuple[str, str]], looked_up, lookup, entries: list[dict], reviewed: str = ""):
    """Fills each package's state; `lookup(name)` is pypi_project (or a stand-in in the tests)."""
    result = [Package(canonical(n), public(v)) for n, v in packages]
    need = [p for p in result if (p.name, p.version) not in looked_up]
    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip([p.name for p in need], pool.map(_safe(lookup), [p.name for p in need])))
    for p in result:
        entry = next((e for e in entries if covers(e, p)), None)
        if (p.name, p.version) in looked_up:
            p.how, p.vulns = "pip-audit", looked_up[(p.name, p.version)]
        elif isinstance(answers[p.name], Exception):
            p.note = f"PyPI project JSON: {type(answers[p.name]).__name__}"
        elif same(answers[p.name][0], p.version):
            p.how, p.vulns = "pypi-json", answers[p.name][1]
        else:
            p.note = f"latest {answers[p.name][0]}"
        if p.how == "unaudited" and entry is not None and entry["verdict"] == "not affected":
            p.how, p.note = "review", f"reviewed by hand {reviewed}: {entry['verdict']}; {p.note}"
        if entry is not None:  # only the advisories the entry names: a new one is never hidden
            named = set(entry["advisories"])
            why = entry["why"] if entry["verdict"] == "accepted" else f"reviewed, not affected: {entry['why']}"
            p.justified = {v.id: why for v in p.vulns if v.names() & named}
    stale = [e for e in entries if not any(covers(e, p) for p in result)]
    return result, stale


def covers(entry: dict, p: Package) -> bool:
    return canonical(entry["name"]) == p.name and same(entry["version"], p.version)


def _safe(lookup):
    def call(name):
        try:
            return lookup(name)
        except Exception as exc:  # noqa: BLE001 - a package that cannot be looked up stays unaudited
            return exc

    return call


def verdict(result: list[Package]) -> int:
    if any(v.id not in p.justified for p in result for v in p.vulns):
        return 1
    return 2 if any(p.how == "unaudited" for p in result) else 0


def report(result: list[Package], stale: list[dict], reviewed: str) -> str:
    lines = []
    by_how = {how: [p for p in result if p.how == how] for how in ("pip-audit", "pypi-json", "review", "unaudited")}
    lines.append(
        f"{len(result)} packages (the pins and the environment): "
        f"{len(by_how['pip-audit'])} audited by pip-audit, "
        f"{len(by_how['pypi-json'])} by PyPI's project JSON (the latest release), "
        f"{len(by_how['review'])} reviewed by hand ({reviewed or 'no review'}), "
        f"{len(by_how['unaudited'])} NOT audited"
    )
    found = [(p, v) for p in result for v in p.vulns]
    lines.append(
        f"known vulnerabilities: {len(found)}, "
        f"{sum(v.id in p.justified for p, v in found)} of them justified in {REVIEW.name}"
    )
    for p, v in found:
        fix = ",".join(v.fixed_in) or "no fix released"
        tag = "justified" if v.id in p.justified else "NOT JUSTIFIED"
        lines.append(f"  {tag}: {p.name}=={p.version}  {v.id} ({','.join(v.aliases)})  fixed in: {fix}")
        lines.append(f"      {' '.join(v.text.split())[:300]}")
        if v.id in p.justified:
            lines.append(f"      why: {' '.join(p.justified[v.id].split())}")
    for p in by_how["review"]:
        lines.append(f"  reviewed: {p.name}=={p.version} ({p.note})")
    for p in by_how["unaudited"]:
        lines.append(f"  NOT audited: {p.name}=={p.version} ({p.note})")
    for e in stale:
        lines.append(f"  stale review entry (no such package installed or pinned): {e['name']}=={e['version']}")
    return "\n".join(lines)


def pins(pyproject: Path = PYPROJECT) -> list[str]:
    """Every requirement of pyproject.toml, the runtime list and every extra; all must be exact (==)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    found = set(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        found.update(extra)
    loose = sorted(p for p in found if "==" not in p)
    if loose:
        raise ValueError(f"not pinned exactly: {loose}")
    return sorted(found, key=str.lower)


def packages_in(requirements: Path) -> list[tuple[str, str]]:
    """The exact pins, and every distribution of this environment (a pin it has at another version: both)."""
    found = set()
    for line in requirements.read_text().split():
        name, _, version = line.partition("==")
        found.add((canonical(name), public(version)))
    for dist in importlib.metadata.distributions():
        if canonical(dist.metadata["Name"]) != PROJECT:
            found.add((canonical(dist.metadata["Name"]), public(dist.version)))
    return sorted(found)


def main(out: Path) -> int:
    reports = [json.loads((out / f"{name}.json").read_text()) for name in ("pinned", "venv")]
    data, entries = load_review()
    reviewed = str(data.get("reviewed", ""))
    result, stale = decide(
        packages_in(out / "requirements.txt"), from_pip_audit(reports), pypi_project, entries, reviewed
    )
    text = report(result, stale, reviewed)
    (out / "result.json").write_text(
        json.dumps(
            [
                {
                    "name": p.name,
                    "version": p.version,
                    "how": p.how,
                    "note": p.note,
                    "vulns": [
                        {"id": v.id, "aliases": v.aliases, "fixed_in": v.fixed_in, "justified": p.justified.get(v.id)}
                        for v in p.vulns
                    ],
                }
                for p in result
            ],
            indent=2,
        )
    )
    print(text)
    return verdict(result)


if __name__ == "__main__":
    try:
        if sys.argv[1] == "--pins":
            Path(sys.argv[2]).write_text("".join(f"{p}\n" for p in pins()))
            status = 0
        else:
            status = main(Path(sys.argv[1]))
    except Exception:  # noqa: BLE001 - an audit that could not run is no result (2), never "vulnerable" (1)
        traceback.print_exc()
        status = 2
    sys.exit(status)
