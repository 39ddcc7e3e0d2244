#!/usr/bin/env bash
# Known vulnerabilities in the project's dependencies, with pip-audit (PyPI's advisory data, from OSV):
#   1. pinned: the exact pins of pyproject.toml (the runtime list and every extra), as written there;
#   2. venv:   the environment `make install` builds (.venv): those pins plus everything they pulled in.
# Where pip-audit cannot look a package up (its PyPI service reads pypi.org/pypi/NAME/VERSION/json; some
# networks and mirrors serve only pypi.org/pypi/NAME/json), a partial check of the pins follows: PyPI's
# project JSON lists the advisories of the latest release, so it audits each pin that is the latest one.
#
#   reliability/audit.sh [OUT_DIR]        # default build/audit; needs pip-audit (.[reliability]) and pypi.org
#
# Writes OUT_DIR/requirements.txt (the pins), pinned.json and venv.json (pip-audit's JSON, descriptions and
# aliases included), fallback.json (the partial check, when it ran) and summary.txt, which it also prints.
# Exit status: 0 without known vulnerabilities, 1 with some, 2 when the audit could not run or could not
# look up every pin (then "0 vulnerabilities" is no result: the summary says what was and was not audited).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-build/audit}
mkdir -p "$OUT"

if ! "$PY" -m pip_audit --version >/dev/null 2>&1; then
    echo "pip-audit is not installed for $PY: pip install -e '.[reliability]'" >&2
    exit 2
fi

"$PY" - "$OUT/requirements.txt" <<'PYTHON' || exit 2
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = set(project["dependencies"])
for extra in project.get("optional-dependencies", {}).values():
    pins.update(extra)
loose = sorted(p for p in pins if "==" not in p)
if loose:
    sys.exit(f"not pinned exactly: {loose}")
open(sys.argv[1], "w").write("".join(f"{p}\n" for p in sorted(pins, key=str.lower)))
PYTHON

common=(--format json --desc on --aliases on --progress-spinner off --timeout 60)
echo "pip-audit $("$PY" -m pip_audit --version | awk '{print $2}'): $(wc -l <"$OUT/requirements.txt") pins from pyproject.toml, then the .venv"
for target in pinned venv; do
    if [ $target = pinned ]; then
        args=(-r "$OUT/requirements.txt" --no-deps --disable-pip)
    else
        args=(--skip-editable)
    fi
    "$PY" -m pip_audit "${args[@]}" "${common[@]}" -o "$OUT/$target.json" 2>"$OUT/$target.err"
    rc=$?
    if [ $rc -gt 1 ] || [ ! -s "$OUT/$target.json" ]; then
        cat "$OUT/$target.err" >&2
        exit 2
    fi
done

"$PY" - "$OUT" <<'PYTHON' | tee "$OUT/summary.txt"
import json, sys, urllib.request
from pathlib import Path

out = Path(sys.argv[1])
found_any, incomplete = False, False
for name in ("pinned", "venv"):
    deps = json.loads((out / f"{name}.json").read_text())["dependencies"]
    found = [(d, v) for d in deps for v in d.get("vulns", [])]
    missing = [d for d in deps if "skip_reason" in d and "editable" not in d["skip_reason"]]
    print(f"pip-audit, {name}: {len(deps)} packages, {len(found)} known vulnerabilities in "
          f"{len({d['name'] for d, _ in found})} packages, {len(missing)} could not be looked up")
    for d, v in found:
        fix = ",".join(v.get("fix_versions", [])) or "no fix released"
        print(f"  {d['name']}=={d['version']}  {v['id']}  ({','.join(v.get('aliases', []))})  fixed in: {fix}")
        print(f"      {' '.join(v.get('description', '').split())[:300]}")
    found_any |= bool(found)
    incomplete |= bool(missing)
if not incomplete:
    sys.exit(1 if found_any else 0)

print("pip-audit could not look everything up: each pin against PyPI's project JSON (its latest release)")
fallback, older, failed = [], [], []
for line in (out / "requirements.txt").read_text().split():
    pkg, _, version = line.partition("==")
    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/{pkg}/json", timeout=30) as r:
            data = json.load(r)
    except Exception as exc:  # noqa: BLE001 - reported, and the audit marked incomplete
        failed.append(f"{pkg} ({type(exc).__name__})")
        continue
    latest = data["info"]["version"]
    if latest != version:
        older.append(f"{pkg}=={version} (latest {latest})")
        fallback.append({"name": pkg, "pinned": version, "latest": latest, "vulnerabilities": None})
        continue
    vulns = [v for v in data.get("vulnerabilities", []) if not v.get("withdrawn")]
    fallback.append({"name": pkg, "pinned": version, "latest": latest, "vulnerabilities": vulns})
    for v in vulns:
        found_any = True
        fix = ",".join(v.get("fixed_in") or []) or "no fix released"
        print(f"  {pkg}=={version}  {v['id']}  ({','.join(v.get('aliases') or [])})  fixed in: {fix}")
        print(f"      {' '.join((v.get('summary') or v.get('details') or '').split())[:300]}")
(out / "fallback.json").write_text(json.dumps(fallback, indent=2))
audited = [f for f in fallback if f["vulnerabilities"] is not None]
print(f"  {len(audited)} pins are the latest release, audited: "
      f"{sum(len(f['vulnerabilities']) for f in audited)} known vulnerabilities")
print(f"  {len(older)} pins are older than the latest release, NOT audited here: {', '.join(older) or '-'}")
if failed:
    print(f"  {len(failed)} pins could not be fetched: {', '.join(failed)}")
print("  the rest of the .venv (transitive dependencies): NOT audited here")
sys.exit(1 if found_any else 2)
PYTHON
exit "${PIPESTATUS[0]}"
