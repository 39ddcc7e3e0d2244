#!/usr/bin/env bash
# Put Debian's `prometheus` and `promtool` binaries in the given directory (default .venv/bin), for the
# metrics check in the tests (promtool check metrics) and the deployment smoke test. Uses the package
# registry only (apt-get download, no root needed, nothing installed system-wide). Exits 0 without them
# when apt is unavailable: the tests that need them skip and say why.
set -euo pipefail
dest=$(realpath "${1:-.venv/bin}")
[[ -x "$dest/promtool" && -x "$dest/prometheus" ]] && exit 0
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "get-prometheus: no apt-get/dpkg-deb here; promtool checks will be skipped" >&2
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download prometheus >/dev/null 2>&1; then
    echo "get-prometheus: apt-get download prometheus failed; promtool checks will be skipped" >&2
    exit 0
fi
dpkg-deb -x prometheus_*.deb root
cp root/usr/bin/promtool root/usr/bin/prometheus "$dest/"
echo "get-prometheus: installed $(ls prometheus_*.deb) binaries in $dest"
