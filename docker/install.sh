#!/usr/bin/env bash
# Install TrueFace and the dependencies pinned in its pyproject.toml (torch==2.14.1,
# torchvision==0.29.1, ray[default,train,tune]==2.60.0, ...) into one Python environment.
#
# Usage:  docker/install.sh [--editable | --deps-only] [SRC]
#
#   SRC          the project folder (the one holding pyproject.toml); default: this script's repo
#   --editable   install SRC in editable mode (pip install -e): the code keeps running from SRC,
#                so jobs.tune finds SRC/search_spaces/ whatever the current directory is.
#                docker/Dockerfile uses this mode.
#   --deps-only  install only the dependencies listed in pyproject.toml, not the project itself
#                (the Dockerfile's cached layer: editing the code then does not reinstall torch).
#                Reads pyproject.toml with tomllib, so needs Python 3.11+.
#
# The Python is $PYTHON if set, else `python` on PATH (in a virtualenv: its python; in the
# rayproject/ray image: /home/ray/anaconda3/bin/python). It works in a fresh virtualenv and outside
# Docker alike; pip options come from the usual PIP_* variables (the Dockerfile sets
# PIP_NO_CACHE_DIR=1, say). Nothing here needs root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mode=regular
case "${1:-}" in
    --editable) mode=editable; shift ;;
    --deps-only) mode=deps; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
esac
if [[ $# -gt 1 ]]; then
    echo "install.sh: at most one SRC folder, got: $*" >&2
    exit 2
fi
src="${1:-$here/..}"
if [[ ! -f "$src/pyproject.toml" ]]; then
    echo "install.sh: no pyproject.toml in $src: give the TrueFace project folder" >&2
    exit 2
fi
src="$(cd "$src" && pwd)"
python="${PYTHON:-python}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "install.sh: no '$python' on PATH (set PYTHON=/path/to/python)" >&2
    exit 2
fi
# pyproject.toml says requires-python >= 3.10; the cluster image is 3.11 (same as the Ray image).
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
    echo "install.sh: $("$python" -V 2>&1) is too old; TrueFace needs Python >= 3.10" >&2
    exit 2
}
echo "install.sh: installing $src ($mode) with $("$python" -c 'import sys; print(sys.executable)')"

if [[ $mode == deps ]]; then
    # The [project].dependencies of pyproject.toml, one per line, exactly as pinned there.
    mapfile -t requirements < <("$python" - "$src/pyproject.toml" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:
    sys.exit("install.sh: --deps-only reads pyproject.toml with tomllib (Python 3.11+); "
             "on Python 3.10 run install.sh without --deps-only")
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print("\n".join(deps))
EOF
)
    if [[ ${#requirements[@]} -eq 0 ]]; then
        echo "install.sh: no dependencies found in $src/pyproject.toml" >&2
        exit 1
    fi
    "$python" -m pip install "${requirements[@]}"
    echo "install.sh: dependencies installed (the project itself is not)"
    exit 0
fi

# pip builds the project with setuptools. By default it first downloads setuptools into a
# throwaway build environment ("build isolation"); when the environment already has a recent
# enough one (pyproject.toml asks for setuptools>=68; building wheels needs >= 70.1 or the
# `wheel` package), building with it saves that download and lets an offline install succeed.
build_flags=()
if "$python" - <<'EOF'
import sys
from importlib import metadata


def version(name):
    try:
        return tuple(int(part) for part in metadata.version(name).split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return None


setuptools = version("setuptools")
ok = setuptools is not None and (setuptools >= (70, 1) or (setuptools >= (68, 0) and version("wheel")))
sys.exit(0 if ok else 1)
EOF
then
    build_flags+=(--no-build-isolation)
fi

if [[ $mode == editable ]]; then
    "$python" -m pip install ${build_flags[@]+"${build_flags[@]}"} --editable "$src"
else
    "$python" -m pip install ${build_flags[@]+"${build_flags[@]}"} "$src"
fi

# The check that matters on a cluster: Ray workers import the project by name, from wherever
# they run, so import it from a directory that is not the source tree.
(cd / && "$python" -c 'import trueface, jobs.pipeline, jobs.tune; print("install.sh: trueface importable from", trueface.__file__)')
