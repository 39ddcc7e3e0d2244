#!/usr/bin/env bash
# Deployment smoke test, run by hand on a machine with a Docker engine (CI has none):
#   docker/smoke.sh                        # a Docker engine is running (`docker info` works)
#   ENGINE=path/to/engine-ctl docker/smoke.sh
# 1. when `docker info` fails, runs `$ENGINE start` if ENGINE names an executable taking start/stop (and
#    `$ENGINE stop` at the end), else stops; puts the pinned torch wheel in docker/wheels/ when pip can get it;
# 2. builds the image (host network, so it also works where Docker has no bridge network);
# 3. runs it with host networking on 127.0.0.1:$PORT and waits for Docker's health check to say healthy;
# 4. sends a completion, a score and a metrics scrape, and checks their contents;
# 5. runs Prometheus natively on 127.0.0.1 against the container and checks through its HTTP API that the
#    target is up and that a query on the service's metrics returns data;
# 6. sends SIGTERM (docker stop) during a streaming request and checks that the stream ends with
#    `data: [DONE]`, that /ready turned 503 during the drain and that the container exits 0;
# 7. removes what it created (container, image unless KEEP_IMAGE=1, temporary files).
# Optional variables: ENGINE, IMAGE, KEEP_IMAGE, PORT, PROM_PORT, PROMETHEUS, PY (docs/deployment.md).
# Every request goes to 127.0.0.1 and every wait is bounded. Prints the time of each step.
set -euo pipefail
ENGINE=${ENGINE:-}
# A relative ENGINE path means relative to where the script was called from, not to the repository root.
if [[ $ENGINE == */* ]]; then ENGINE=$(realpath -m -- "$ENGINE"); fi
cd "$(dirname "$0")/.."
REPO=$PWD
IMAGE=${IMAGE:-gpt2-serve:smoke}
NAME=gpt2-serve-smoke-$$
PORT=${PORT:-18000}
PROM_PORT=${PROM_PORT:-19090}
PROMETHEUS=${PROMETHEUS:-$REPO/.venv/bin/prometheus}
PY=${PY:-$REPO/.venv/bin/python}
DRAIN=20
TMP=$(mktemp -d)
STARTED_ENGINE=0
PROM_PID=
T0=$(date +%s.%N)

step() { printf '[%6.1fs] %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*"; }
fail() { step "FAIL: $*"; exit 1; }
url() { echo "http://127.0.0.1:$PORT$1"; }

cleanup() {
    local status=$?
    [[ -n $PROM_PID ]] && kill "$PROM_PID" 2>/dev/null && wait "$PROM_PID" 2>/dev/null
    if docker inspect "$NAME" >/dev/null 2>&1; then
        [[ $status -ne 0 ]] && { echo "--- container log (last 30 lines)"; docker logs --tail 30 "$NAME" 2>&1; }
        docker rm -f "$NAME" >/dev/null 2>&1 || true
    fi
    [[ ${KEEP_IMAGE:-0} == 1 ]] || docker rmi -f "$IMAGE" >/dev/null 2>&1 || true
    [[ $STARTED_ENGINE == 1 ]] && "$ENGINE" stop >/dev/null 2>&1 || true
    rm -rf "$TMP"
    if [[ $status -eq 0 ]]; then step "PASS (cleaned up)"; else step "cleaned up after failure (exit $status)"; fi
}
trap cleanup EXIT

# --- 1. engine and wheels ---------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    [[ -n $ENGINE ]] || fail "no Docker engine (docker info fails): start one, or set ENGINE (docs/deployment.md)"
    command -v "$ENGINE" >/dev/null || fail "no Docker engine, and ENGINE=$ENGINE is not an executable"
    "$ENGINE" start
    STARTED_ENGINE=1
fi
step "engine up"
torch_version=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
if ! compgen -G "docker/wheels/torch-$torch_version-*.whl" >/dev/null; then
    "$PY" -m pip download --quiet --no-deps --only-binary :all: -d docker/wheels "torch==$torch_version" \
        || step "no local torch wheel; the build will use the CPU index"
fi
[[ -d models/default ]] || fail "models/default (the bundled model) is missing"

# --- 2. build -----------------------------------------------------------------------------------------------
docker build --network host -t "$IMAGE" . >"$TMP/build.log" 2>&1 || { tail -40 "$TMP/build.log"; fail "build"; }
step "image built: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[[ $user == 10001:10001 ]] || fail "image user is '$user', expected non-root 10001:10001"

# --- 3. run and wait for healthy ----------------------------------------------------------------------------
docker run -d --name "$NAME" --network host -e HOST=127.0.0.1 -e PORT="$PORT" -e DRAIN_TIMEOUT="$DRAIN" \
    --stop-timeout $((DRAIN + 10)) "$IMAGE" >/dev/null
health=
for _ in $(seq 1 180); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
    [[ $health == healthy ]] && break
    [[ $(docker inspect -f '{{.State.Running}}' "$NAME") == true ]] || fail "container exited"
    sleep 1
done
[[ $health == healthy ]] || fail "not healthy after 180 s (status: $health)"
step "container healthy"

# --- 4. completion, score, metrics ----------------------------------------------------------------------------
curl -sS --max-time 60 "$(url /v1/completions)" -H 'Content-Type: application/json' \
    -d '{"model": "default", "prompt": "It is a truth universally acknowledged", "max_tokens": 16, "temperature": 0}' \
    >"$TMP/completion.json"
"$PY" - "$TMP/completion.json" <<'EOF' || fail "completion"
import json, sys
body = json.load(open(sys.argv[1]))
assert body["object"] == "text_completion", body
assert body["usage"]["completion_tokens"] >= 1, body
print("  completion:", repr(body["choices"][0]["text"]), body["usage"])
EOF
step "completion answered"
curl -sS --max-time 60 "$(url /v1/score)" -H 'Content-Type: application/json' \
    -d '{"model": "default", "context": "In the beginning God created", "continuations": [" the heaven", " a spreadsheet"]}' \
    >"$TMP/score.json"
"$PY" - "$TMP/score.json" <<'EOF' || fail "score"
import json, sys
body = json.load(open(sys.argv[1]))
rows = body["results"]
assert len(rows) == 2 and all(r["sum_logprob"] < 0 and r["num_tokens"] >= 1 for r in rows), body
print("  score:", [(r["continuation"], round(r["sum_logprob"], 2), r["greedy"]) for r in rows])
EOF
step "score answered"
curl -sS --max-time 10 "$(url /metrics)" >"$TMP/metrics.txt"
grep -q '^gpt2_serve_generation_tokens_total{' "$TMP/metrics.txt" || fail "metrics lack generation tokens"
grep -q '^gpt2_serve_model_info{.*model="default"' "$TMP/metrics.txt" || fail "metrics lack model_info"
step "metrics scraped ($(grep -c '^gpt2_serve_' "$TMP/metrics.txt") series)"

# --- 5. Prometheus, natively, against the container ---------------------------------------------------------------
if [[ -x $PROMETHEUS ]]; then
    cat >"$TMP/prometheus.yml" <<EOF
global: {scrape_interval: 2s}
scrape_configs:
  - job_name: gpt2-serve
    static_configs: [{targets: ["127.0.0.1:$PORT"]}]
EOF
    "$PROMETHEUS" --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
        --web.listen-address="127.0.0.1:$PROM_PORT" >"$TMP/prometheus.log" 2>&1 &
    PROM_PID=$!
    ok=0
    for _ in $(seq 1 60); do
        if "$PY" - "$PROM_PORT" <<'EOF' 2>/dev/null; then ok=1; break; fi
import json, sys, urllib.parse, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}/api/v1/"
targets = json.load(urllib.request.urlopen(base + "targets", timeout=2))["data"]["activeTargets"]
assert targets and all(t["health"] == "up" for t in targets)
query = urllib.parse.quote('sum by (model, version) (gpt2_serve_generation_tokens_total)')
result = json.load(urllib.request.urlopen(base + "query?query=" + query, timeout=2))["data"]["result"]
assert result and float(result[0]["value"][1]) > 0
print("  prometheus: target up;", result[0]["metric"], "generation tokens =", result[0]["value"][1])
EOF
        sleep 1
    done
    [[ $ok == 1 ]] || { tail -5 "$TMP/prometheus.log"; fail "prometheus: target not up or query empty after 60 s"; }
    kill "$PROM_PID"; wait "$PROM_PID" 2>/dev/null || true; PROM_PID=
    step "prometheus scraped the container and answered a query"
else
    step "SKIP prometheus: no binary at $PROMETHEUS (scripts/get-prometheus.sh .venv/bin)"
fi

# --- 6. SIGTERM during a stream --------------------------------------------------------------------------------
curl -sS -N --max-time 120 "$(url /v1/completions)" -H 'Content-Type: application/json' \
    -d '{"model": "default", "prompt": "And the LORD said", "max_tokens": 400, "ignore_eos": true, "stream": true}' \
    >"$TMP/stream.txt" 2>"$TMP/stream.err" &
STREAM_PID=$!
for _ in $(seq 1 300); do grep -q '^data: {' "$TMP/stream.txt" 2>/dev/null && break; sleep 0.1; done
grep -q '^data: {' "$TMP/stream.txt" || fail "stream did not start"
docker kill --signal SIGTERM "$NAME" >/dev/null
step "SIGTERM sent with a stream in flight"
ready=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$(url /ready)" || true)
wait "$STREAM_PID" || fail "stream client failed: $(cat "$TMP/stream.err")"
frames=$(grep -c '^data: {' "$TMP/stream.txt")
tail -n 3 "$TMP/stream.txt" | grep -q '^data: \[DONE\]' || fail "stream did not end with [DONE]"
docker wait "$NAME" >"$TMP/exit" || true
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
step "stream ended cleanly ($frames frames, then [DONE]); /ready during drain: $ready; exit code $exit_code"
[[ $ready == 503 || $ready == 000 ]] || fail "/ready answered $ready during the drain"
[[ $exit_code == 0 ]] || fail "container exit code $exit_code"
