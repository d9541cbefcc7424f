#!/usr/bin/env bash
# The one-command GPU check (issue 11 §3), run from the repo root on a GPU machine:
#
#     bash docker/gpu_check.sh                 # tables in results/bench-gpu/
#     OUT=/mnt/shared/results bash docker/gpu_check.sh
#     bash docker/gpu_check.sh --trace         # also a profiler trace per stage (bench-gpu/trace-stageN.json.gz)
#     bash docker/gpu_check.sh --compile       # runtime.compile=true, compiled beside eager (9-minute timeout)
#
# Prints nvidia-smi, then runs `python -m jobs.benchmark gpu` (no Ray, nothing downloaded) under a
# 6-minute timeout (9 with --compile). It checks, on Stage I (224 px from 256 px JPEGs) and Stage II (1024 px) of the
# paper preset, through the real training engine (DataLoader on every core but one, batched
# augmentation on the GPU, train_one_epoch): Stage I >= 3500 img/s and Stage II >= 170 img/s on an
# H100; the input path never the limit (engine >= 0.90 of the model alone on batches already on the
# GPU; GPU busy >= 90% by nvml where pynvml is installed); peak GPU memory per stage.
# The targets judge only this full run at the paper's sizes: with --quick, --images, --image-size or
# --batch-size the target column says why none applies.
# Exits with the benchmark's status (1: something was not measured, listed under "Not measured";
# 124: it ran past its timeout, and bench.json holds the stages finished by then, each stage it did
# not finish listed as "not finished"; bench.json is rewritten as the run starts, so an earlier
# run's never passes for this one's). PYTHON picks the interpreter
# (default: python, else python3, as on images that ship only python3).
set -u

cd "$(dirname "$0")/.." || exit 1
python="${PYTHON:-$(command -v python || command -v python3)}"

# the software the figures come from (a GPU image may ship other versions than the project's CPU machines)
"$python" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda available', torch.cuda.is_available())"

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
else
    echo "nvidia-smi not found: no NVIDIA driver here; the benchmark will say which device it ran on"
fi

# --compile compiles each stage's training forward in its first step (about a minute for Stage I
# on an H200, Stage II's never timed) and times the model alone a second time, eager: 9 minutes.
limit=360
for arg in "$@"; do
    if [ "$arg" = "--compile" ]; then limit=540; fi
done

timeout "$limit" "$python" -m jobs.benchmark gpu --results-dir "${OUT:-results}" "$@"
status=$?
if [ "$status" -eq 124 ]; then
    echo "gpu_check: the benchmark ran past $limit s and was stopped; the stages it finished are in ${OUT:-results}/bench-gpu/ (those it did not: 'not finished' under its failures)" >&2
fi
exit "$status"
