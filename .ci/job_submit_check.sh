#!/usr/bin/env bash
# CI: the demo pipeline submitted as a Ray job to a local head, as README's "Running on a Ray cluster"
# shows, proving the uploaded package alone runs it. The head (and so the job's driver and every
# Train worker) runs a Python that has the dependencies but not the project, as a cluster image
# does, and the entrypoint .ci/run_job_checked.py fails if any project module came from elsewhere.
# Starts a head on 127.0.0.1 with its own temp dir, submits, waits, checks the results, stops that
# head (only that one). Needs the .venv that `make test` created. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
ray_cli="$repo/.venv/bin/ray"   # the CLI is only a client here; the head runs $deps_py
out="$(mktemp -d /tmp/trueface-job-XXXXXX)"
# Token auth with a token of this check's own: `ray start` with RAY_AUTH_MODE=token needs one to
# exist, and ~/.ray/auth_token exists only where some ray.init() (make test) made it.
(umask 077 && "$repo/.venv/bin/python" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$out/auth_token")
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$out/auth_token"
port=8275
address="http://127.0.0.1:$port"
head_pid="" submission="" passed=""

# A bare venv whose .pth file adds .venv's site-packages as a plain path line. Python does not
# process the .pth files inside a folder added that way, so the editable install's finder
# (__editable__*.pth) never loads: the dependencies import, the project does not.
make_deps_python() {
    local venv="$1" site_dirs
    "$repo/.venv/bin/python" -m venv --without-pip "$venv"
    site_dirs="$("$repo/.venv/bin/python" -c 'import sysconfig; p = sysconfig.get_paths()
print("\n".join(dict.fromkeys([p["purelib"], p["platlib"]])))')"
    echo "$site_dirs" > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/trueface-deps.pth"
}

# Run from $out, not the repository, so the current directory cannot supply the project either.
check_deps_python() {
    local py="$1"
    (cd "$out" && env -u PYTHONPATH "$py" -c 'import ray, torch') ||
        { echo "$py cannot import ray and torch: is .venv complete (make setup)?" >&2; return 1; }
    if (cd "$out" && env -u PYTHONPATH "$py" -c 'import trueface' 2>/dev/null) ||
       (cd "$out" && env -u PYTHONPATH "$py" -c 'import jobs' 2>/dev/null); then
        echo "$py imports the project without the upload, so the check would prove nothing" >&2
        return 1
    fi
}

# `ray stop` would end every Ray on this machine. `ray start --block` ends the processes of its own
# node when it gets SIGTERM (and they die with it if it is killed), so stop the head by its pid.
stop_head() {
    if [ -n "$submission" ]; then
        "$ray_cli" job stop --address "$address" "$submission" >/dev/null 2>&1 || true
    fi
    [ -n "$head_pid" ] || return 0
    kill -TERM "$head_pid" 2>/dev/null || return 0
    for _ in $(seq 30); do kill -0 "$head_pid" 2>/dev/null || return 0; sleep 1; done
    kill -KILL "$head_pid" 2>/dev/null || true
}
# On success keep only the results and the logs: Ray's session folder under $out took 1.8 GB and
# the run's checkpoints (runs/, checked above) 1.8 GB more, so a developer's repeated .ci/run
# filled a disk. On failure keep everything, the head's and the job's logs included.
finish() {
    stop_head
    if [ -n "$passed" ]; then rm -rf "$out/ray" "$out/deps" "$out/runs"; fi
}
trap finish EXIT

deps_py="$out/deps/bin/python"
make_deps_python "$out/deps"
check_deps_python "$deps_py"
echo "head Python without the project: $deps_py"

# PATH puts $deps_py first: the job's entrypoint says `python`, and Ray runs it with the head's PATH.
(cd "$out" && exec env -u PYTHONPATH PATH="$out/deps/bin:$PATH" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
    "$deps_py" -m ray.scripts.scripts start --head --block --num-cpus=2 --port=6391 --temp-dir="$out/ray" \
    --dashboard-host=127.0.0.1 --dashboard-port=$port --disable-usage-stats) > "$out/head.log" 2>&1 &
head_pid=$!
for _ in $(seq 120); do
    grep -q "Ray runtime started" "$out/head.log" && break
    kill -0 "$head_pid" 2>/dev/null || { cat "$out/head.log" >&2; echo "the Ray head exited while starting" >&2; exit 1; }
    sleep 1
done
grep -q "Ray runtime started" "$out/head.log" || { cat "$out/head.log" >&2; echo "the Ray head did not start in 120 s" >&2; exit 1; }

started=$(date +%s)
submission="trueface-ci-$started"
"$ray_cli" job submit --address "$address" --working-dir . --submission-id "$submission" -- \
    python .ci/run_job_checked.py jobs.pipeline --run-name ci-job \
    output.runs_dir="$out/runs" output.results_dir="$out/results" 2>&1 | tee "$out/job.log" || true
status="$("$ray_cli" job status --address "$address" "$submission")"
echo "$status"
echo "$status" | grep -qi "succeeded" || { echo "job did not succeed (log: $out/job.log)" >&2; exit 1; }
grep -qE "run_job_checked: checked [0-9]+ project modules .*\(python $deps_py\)" "$out/job.log" ||
    { echo "the job's log lacks run_job_checked's line for $deps_py (log: $out/job.log)" >&2; exit 1; }
for f in results/ci-job/summary.md results/ci-job/metrics.parquet runs/ci-job/stage2/best.pt; do
    test -s "$out/$f" || { echo "missing $out/$f" >&2; exit 1; }
done
passed=1
echo "job submission check passed in $(( $(date +%s) - started )) s: the upload alone ran the job; results in $out/results/ci-job (its checkpoints are removed on exit)"
