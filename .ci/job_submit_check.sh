#!/usr/bin/env bash
# CI: the demo pipeline submitted as a Ray job to a local head, as README's "Ray job submission"
# shows. Starts a head on 127.0.0.1, submits, waits, checks the results, stops the head.
# Needs the .venv that `make test` created. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"   # the head (and so the job's driver) runs the project's Python
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
out="$(mktemp -d /tmp/trueface-job-XXXXXX)"
port=8275
ray start --head --num-cpus=2 --port=6391 --dashboard-host=127.0.0.1 --dashboard-port=$port --disable-usage-stats
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
started=$(date +%s)
ray job submit --address "http://127.0.0.1:$port" --working-dir . --submission-id "trueface-ci-$started" -- \
    python -m jobs.pipeline --run-name ci-job output.runs_dir="$out/runs" output.results_dir="$out/results"
status="$(ray job status --address "http://127.0.0.1:$port" "trueface-ci-$started")"
echo "$status"
echo "$status" | grep -qi "succeeded" || { echo "job did not succeed" >&2; exit 1; }
for f in results/ci-job/summary.md results/ci-job/metrics.parquet runs/ci-job/stage2/best.pt; do
    test -s "$out/$f" || { echo "missing $out/$f" >&2; exit 1; }
done
echo "job submission check passed in $(( $(date +%s) - started )) s: results in $out/results/ci-job"
