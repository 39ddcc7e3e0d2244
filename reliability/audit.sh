#!/usr/bin/env bash
# Known vulnerabilities in the project's dependencies, with pip-audit (PyPI's advisory data, from OSV):
#   1. pinned: the exact pins of pyproject.toml (the runtime list and every extra), as written there;
#   2. venv:   the environment `make install` builds (.venv): those pins plus everything they pulled in.
# Then reliability/audit.py decides: where pip-audit could not look a package up (its PyPI service reads
# pypi.org/pypi/NAME/VERSION/json; some networks and mirrors serve only pypi.org/pypi/NAME/json), PyPI's
# project JSON audits each package that is the latest release; reliability/audit-review.toml holds the hand
# review of the others (exact versions, dated) and the justification of each known vulnerability accepted.
#
#   reliability/audit.sh [OUT_DIR]        # default build/audit; needs pip-audit (.[reliability]) and pypi.org
#
# Writes OUT_DIR/requirements.txt (the pins), pinned.json and venv.json (pip-audit's JSON, descriptions and
# aliases included), result.json (each package: how it was audited, its vulnerabilities) and summary.txt,
# which it also prints. Exit status: 0 when every package is audited or reviewed and every known
# vulnerability is justified; 1 with an unjustified vulnerability; 2 when the audit could not run or a
# package is neither audited nor reviewed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-build/audit}
mkdir -p "$OUT"

if ! "$PY" -m pip_audit --version >/dev/null 2>&1; then
    echo "pip-audit is not installed for $PY: pip install -e '.[reliability]'" >&2
    exit 2
fi

"$PY" reliability/audit.py --pins "$OUT/requirements.txt" || exit 2

common=(--format json --desc on --aliases on --progress-spinner off --timeout 60)
echo "pip-audit $("$PY" -m pip_audit --version | awk '{print $2}'): $(wc -l <"$OUT/requirements.txt") pins from pyproject.toml, then the .venv"
for target in pinned venv; do
    if [ $target = pinned ]; then
        args=(-r "$OUT/requirements.txt" --no-deps --disable-pip)
    else
        args=(--skip-editable)
    fi
    rm -f "$OUT/$target.json"  # a failed run must not leave the previous run's results to be judged
    "$PY" -m pip_audit "${args[@]}" "${common[@]}" -o "$OUT/$target.json" 2>"$OUT/$target.err"
    rc=$?  # 1 is also pip-audit's status for a fatal error, which writes no output
    if [ $rc -gt 1 ] || [ ! -s "$OUT/$target.json" ]; then
        cat "$OUT/$target.err" >&2
        exit 2
    fi
done

"$PY" reliability/audit.py "$OUT" | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
