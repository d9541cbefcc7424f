"""docker/: the cluster image, its install script, the KubeRay RayJobs and the cluster-launcher YAML.

No Docker engine nor Kubernetes exists on the development machines, so nothing here builds the
image or applies a manifest. Instead: every YAML parses and has the shape KubeRay / Ray's cluster
launcher expect (the launcher's own schema check included); the jobs the manifests and the
cluster.yaml examples run go through the real argument parsing and config checks of jobs.pipeline
and jobs.tune (--dry-run, with the cluster paths moved into a temporary folder); the image tags
follow pyproject.toml's Ray pin; and docker/install.sh installs the project into a fresh venv.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from jobs import pipeline as pipeline_job
from jobs import tune as tune_job
from tests.conftest import write_tiny_root
from trueface.config import load_config, preset_names

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
KUBERAY = DOCKER / "kuberay"
MANIFESTS = {"pipeline": KUBERAY / "rayjob-pipeline.yaml", "tune": KUBERAY / "rayjob-tune.yaml"}
STORAGE = KUBERAY / "storage.yaml"
CLUSTER = DOCKER / "cluster.yaml"
DATA_MOUNT = "/data"  # the data volume, read-only, on every pod
SHARED = "/mnt/shared"  # the ReadWriteMany volume for runs/, results/, tune/, on every pod
PYTHON_TAG = "py311"


# ----------------------------------------------------------------------------- helpers


def ray_pin() -> str:
    """The X.Y.Z of pyproject.toml's ``ray[...]==X.Y.Z``."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([0-9][\w.]*)", d.replace(" ", "")))]
    assert len(pins) == 1, f"expected one ray==X.Y.Z pin in pyproject.toml, got {deps}"
    return pins[0]


def docs(path: Path) -> list[dict]:
    loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert loaded and all(isinstance(d, dict) for d in loaded), f"{path}: expected YAML mappings"
    return loaded


def rayjob(name: str) -> dict:
    (job,) = docs(MANIFESTS[name])
    return job


def pods(job: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of the head and of every worker group."""
    cluster = job["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (f"worker group {g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]


def gpus(container: dict) -> dict[str, object]:
    res = container.get("resources", {})
    return {k: res.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}


def as_a_ray_job_runs_it(words: list[str]) -> list[str]:
    """The argv a program gets from `ray job submit ... -- WORDS`: the Ray CLI joins the words with
    subprocess.list2cmdline and Ray runs that string with a shell (job_supervisor, shell=True)."""
    return shlex.split(subprocess.list2cmdline(words))


def entrypoint(name: str) -> list[str]:
    """What the RayJob's program receives: KubeRay's submitter runs `ray job submit ... -- ENTRYPOINT`
    in a shell (one split), then the Ray job's shell splits it again."""
    return as_a_ray_job_runs_it(shlex.split(rayjob(name)["spec"]["entrypoint"]))


def cluster_yaml_commands() -> dict[str, list[str]]:
    """The `ray job submit ... -- python -m jobs.X ...` examples in cluster.yaml's comments."""
    lines = [ln.strip()[1:].strip() for ln in CLUSTER.read_text().splitlines() if ln.strip().startswith("#")]
    commands, current = [], ""
    for ln in lines:
        if ln.endswith("\\"):
            current += ln[:-1] + " "
            continue
        commands.append((current + ln).strip())
        current = ""
    found = {}
    for c in commands:
        if c.startswith("ray job submit") and " -- " in c:
            words = shlex.split(c)  # the user's shell
            argv = as_a_ray_job_runs_it(words[words.index("--") + 1:])
            found[argv[2].removeprefix("jobs.")] = argv
    return found


def all_entrypoints() -> dict[str, list[str]]:
    """Every job command shipped in docker/: the two RayJobs and cluster.yaml's examples."""
    out = {f"rayjob-{name}": entrypoint(name) for name in MANIFESTS}
    out.update({f"cluster.yaml-{job}": argv for job, argv in cluster_yaml_commands().items()})
    return out


def flag(argv: list[str], name: str) -> str | None:
    assert not any(a.startswith(name + "=") for a in argv), f"write {name} VALUE, not {name}=VALUE"
    return argv[argv.index(name) + 1] if name in argv else None


def override(argv: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(key + "=")]
    return values[-1] if values else None


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    pattern, out, i = pattern.strip("/"), "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is out of the build context when it, or a folder above it, matches
    a pattern (relative to the context root); later patterns win, '!' takes back."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _pattern_regex(pattern[1:] if negate else pattern)
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a --dry-run must not start Ray")

    monkeypatch.setattr(pipeline_job, "init_ray", refuse)
    monkeypatch.setattr(tune_job, "init_ray", refuse)


# ----------------------------------------------------------------------------- (a) the YAML files


def test_every_yaml_under_docker_parses_and_is_expected():
    found = {p.relative_to(DOCKER).as_posix(): docs(p) for p in sorted(DOCKER.rglob("*.y*ml"))}
    assert {"cluster.yaml", "kuberay/rayjob-pipeline.yaml", "kuberay/rayjob-tune.yaml", "kuberay/storage.yaml"} <= set(found)
    for rel, loaded in found.items():
        if rel.startswith("kuberay/"):
            assert all({"apiVersion", "kind", "metadata", "spec"} <= set(d) for d in loaded), rel
    assert [(d["apiVersion"], d["kind"]) for d in found["kuberay/rayjob-pipeline.yaml"]] == [("ray.io/v1", "RayJob")]
    assert [(d["apiVersion"], d["kind"]) for d in found["kuberay/rayjob-tune.yaml"]] == [("ray.io/v1", "RayJob")]
    assert {d["kind"] for d in found["kuberay/storage.yaml"]} == {"PersistentVolumeClaim"}
    (cluster,) = found["cluster.yaml"]
    assert {"cluster_name", "provider", "docker", "available_node_types", "head_node_type", "setup_commands"} <= set(cluster)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_rayjob_runs_a_gpu_cluster_and_cleans_up(name):
    job = rayjob(name)
    spec = job["spec"]
    assert job["metadata"]["name"].startswith("trueface-")
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].startswith("python -m jobs.")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert str(cluster["rayVersion"]) == ray_pin()

    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert str(head["rayStartParams"].get("num-cpus")) == "0", "nothing should be scheduled on the GPU-less head"
    for container in head["template"]["spec"]["containers"]:
        assert gpus(container) == {"requests": None, "limits": None}, "the head asks for no GPU"

    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert group["replicas"] >= 2 and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (worker,) = group["template"]["spec"]["containers"]
        assert gpus(worker)["limits"] == 1, "one GPU per worker pod"
        assert gpus(worker)["requests"] in (None, 1)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_every_pod_mounts_the_data_read_only_and_the_shared_volume(name):
    claims = {d["metadata"]["name"]: d["spec"] for d in docs(STORAGE)}
    for role, pod in pods(rayjob(name)):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

        data = mounts[DATA_MOUNT]
        assert data.get("readOnly") is True, f"{role}: the data must be mounted read-only"
        data_claim = volumes[data["name"]]["persistentVolumeClaim"]
        assert data_claim.get("readOnly") is True and data_claim["claimName"] in claims, role

        shared = mounts[SHARED]
        assert not shared.get("readOnly"), role
        shared_claim = volumes[shared["name"]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in claims[shared_claim]["accessModes"], f"{role}: {shared_claim} must be ReadWriteMany"
        assert shared_claim == "trueface-shared", "head and workers must share one claim"
        assert {e["name"]: e["value"] for e in container.get("env", [])}.get("TORCH_HOME", "").startswith(DATA_MOUNT + "/")


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_rayjob_outputs_go_to_the_shared_volume(name):
    argv = entrypoint(name)
    assert flag(argv, "--data-root").startswith(DATA_MOUNT + "/")
    for key in ("output.runs_dir", "output.results_dir"):
        assert (override(argv, key) or "").startswith(SHARED + "/"), f"{key} must point at {SHARED}"
    if name == "tune":
        assert flag(argv, "--storage").startswith(SHARED + "/")
        assert int(flag(argv, "--max-concurrent")) == sum(g["replicas"] for g in rayjob(name)["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    if name == "pipeline":
        workers = sum(g["replicas"] for g in rayjob(name)["spec"]["rayClusterSpec"]["workerGroupSpecs"])
        assert override(argv, "scaling.num_workers") == str(workers), "one Train worker per GPU pod"
    # GPUs forced, not "auto": the job may start before any GPU worker has joined
    assert load_config("paper", [f"scaling.use_gpu={override(argv, 'scaling.use_gpu')}"]).scaling.use_gpu == "true"


def test_cluster_yaml_passes_the_cluster_launchers_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER.read_text())
    config = prepare_config(raw)  # what `ray up` does first: defaults of the AWS provider, docker checks
    validate_config(config)  # Ray's JSON schema (no unknown keys) and node-type consistency
    assert raw["provider"]["type"] == "aws"
    assert raw["setup_commands"] == [] and raw["head_setup_commands"] == [] and raw["worker_setup_commands"] == []
    assert raw["file_mounts"] == {}, "data lives on shared storage, not in file_mounts"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert "GPU" not in head.get("resources", {})
    workers = [t for name, t in types.items() if name != raw["head_node_type"]]
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in workers)
    run_options = " ".join(raw["docker"]["run_options"])
    assert f":{DATA_MOUNT}:ro" in run_options and f":{SHARED}" in run_options
    text = CLUSTER.read_text()
    assert "ray up docker/cluster.yaml" in text and "ray job submit --address" in text and "--working-dir ." in text


# ----------------------------------------------------------------------------- (b) the job commands


@pytest.mark.parametrize("label", ["rayjob-pipeline", "rayjob-tune", "cluster.yaml-pipeline", "cluster.yaml-tune"])
def test_job_command_names_modules_presets_and_spaces_that_exist(label):
    argv = all_entrypoints()[label]
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    module = argv[2].removeprefix("jobs.")
    assert (REPO / "jobs" / f"{module}.py").is_file()
    assert module == label.split("-", 1)[1]
    assert flag(argv, "--config") in preset_names()
    space = flag(argv, "--space")
    if module == "tune":
        assert space in {p.stem for p in (REPO / "search_spaces").glob("*.yaml")}
    else:
        assert space is None
    # one policy everywhere: the driver runs on the head and joins the cluster explicitly
    assert flag(argv, "--address") == "auto"


def localized(argv: list[str], tmp_path: Path, data_root: Path) -> list[str]:
    """The job's arguments after `python -m jobs.X`, with the cluster's paths moved under tmp_path:
    /data/... -> the tiny data root, /mnt/shared/... -> tmp_path/shared/..."""
    def moved(value: str) -> str:
        assert value.startswith(SHARED + "/"), value
        return str(tmp_path / "shared" / Path(value).relative_to(SHARED))

    out, args = [], iter(argv[3:])
    for a in args:
        if a == "--data-root":
            next(args)
            out += [a, str(data_root)]
        elif a == "--storage":
            out += [a, moved(next(args))]
        elif a.startswith(("output.runs_dir=", "output.results_dir=")):
            key, value = a.split("=", 1)
            out.append(f"{key}={moved(value)}")
        else:
            out.append(a)
    return out


@pytest.mark.parametrize("label", ["rayjob-pipeline", "rayjob-tune", "cluster.yaml-pipeline", "cluster.yaml-tune"])
def test_job_command_passes_the_real_checks_with_dry_run(label, tmp_path, capsys, no_ray):
    argv = all_entrypoints()[label]
    root = write_tiny_root(tmp_path / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=4)
    args = localized(argv, tmp_path, root)
    main = pipeline_job.main if argv[2] == "jobs.pipeline" else tune_job.main
    # epochs of the paper data's size (Stage I ~500 steps): the tiny root's 4 images per class are
    # less than one step of the cluster's batches, and a search's EMA decays would never act
    args += ["stage1.samples_per_epoch=100000", "stage2.samples_per_epoch=24000"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    shared = tmp_path / "shared"
    if argv[2] == "jobs.pipeline":
        assert f"num_workers: {override(argv, 'scaling.num_workers')}" in out
        assert "use_gpu: 'true'" in out
        assert "image_size: 1024" in out  # the paper's Stage II
        assert str(shared / "runs" / "paper") in out and str(shared / "results" / "paper") in out
    else:
        assert "search paper-" in out and f": {flag(argv, '--num-samples')} trials of Stage I then Stage II" in out
        assert f"trials at once: {flag(argv, '--max-concurrent')}" in out
        assert "(GPU true x 1)" in out
        assert f"tensorboard --logdir {shared / 'tune'}/paper-" in out
        assert f"results:     {shared / 'results'}/paper-" in out
    assert not shared.exists(), "a dry run writes nothing"


# ----------------------------------------------------------------------------- (c) image tags


def test_base_image_follows_the_ray_pin():
    froms = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py\d+)-(gpu|cu\d+)", froms[0])
    assert m, f"expected rayproject/ray:X.Y.Z-py311-gpu (or -cuXXX), got {froms[0]}"
    assert m.group(1) == ray_pin(), "the image's Ray must be pyproject.toml's Ray pin"
    assert m.group(2) == PYTHON_TAG


def test_every_deployment_uses_one_image_tagged_with_the_ray_pin():
    images = {}
    for name in MANIFESTS:
        for role, pod in pods(rayjob(name)):
            for c in pod["containers"]:
                images[f"{name} {role} {c['name']}"] = c["image"]
    cluster_docker = yaml.safe_load(CLUSTER.read_text())["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in cluster_docker:
            images[f"cluster.yaml docker.{key}"] = cluster_docker[key]
    assert len(set(images.values())) == 1, images
    image = next(iter(images.values()))
    tag = image.rsplit(":", 1)[1]
    assert ray_pin() in tag and PYTHON_TAG in tag, image
    # the documented build command produces that image
    assert f"-t {image} ." in (DOCKER / "Dockerfile").read_text()
    assert f"-t {image} ." in (DOCKER / "README.md").read_text()


# ----------------------------------------------------------------------------- the Dockerfile and its context


def test_dockerfile_installs_with_install_sh_into_a_project_folder():
    steps = dockerfile_instructions()
    keywords = [k for k, _ in steps]
    assert keywords[0] == "FROM" and "WORKDIR" in keywords
    runs = [rest for k, rest in steps if k == "RUN"]
    assert any("docker/install.sh" in r for r in runs)
    patterns = dockerignore_patterns()
    for keyword, rest in steps:
        if keyword in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            for source in parts[:-1]:
                if source != ".":
                    assert (REPO / source).exists(), f"{keyword} {source}: no such file"
                    assert not dockerignored(source, patterns), f"{keyword} {source}: excluded by .dockerignore"
                assert not re.match(r"(runs|results|data|\.cache)(/|$)", source), f"{keyword} {source}: no data or outputs in the image"
    assert all(rest != "root" for k, rest in steps if k == "USER"), "Ray's images run as user ray"


def test_the_image_has_pynvml_from_the_gpu_extra_and_make_test_does_not_fetch_it():
    # torch.cuda.utilization needs pynvml: without it jobs.benchmark gpu cannot measure "GPU busy
    # (nvml)" (Stage I's 90% target) on the project's own GPU image
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu = project["optional-dependencies"]["gpu"]
    assert any(re.match(r"nvidia-ml-py\b", r) for r in gpu), gpu
    installed = [set(shlex.split(rest)) for k, rest in dockerfile_instructions()
                 if k == "RUN" and re.search(r"\bpip install\b", rest)]
    assert [r for r in gpu if not any(r in args for args in installed)] == [], "the Dockerfile installs the gpu extra as pinned"
    # a CPU machine's install (make test: .[test]) does not need it
    assert not any("nvidia-ml-py" in r for r in project["dependencies"] + project["optional-dependencies"]["test"])


def test_dockerignore_keeps_the_source_and_drops_state_outputs_and_data():
    patterns = dockerignore_patterns()
    kept = ["pyproject.toml", "README.md", "docker/install.sh"] + sorted(
        p.relative_to(REPO).as_posix() for folder in ("trueface", "jobs", "search_spaces")
        for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert any(k.startswith("trueface/data/") for k in kept)
    assert [k for k in kept if dockerignored(k, patterns)] == []
    dropped = [".git/HEAD", ".venv/bin/python", "runs/paper/stage1/best.pt", "results/demo/metrics.csv",
               ".cache/trueface/synthetic/x.png", "data/faces/dalle/test/fake/a.png", "trueface/__pycache__/model.cpython-311.pyc",
               "jobs/__pycache__/tune.cpython-311.pyc", "best.pt", "somewhere/deep/last.pt", ".pytest_cache/v/cache/nodeids",
               "trueface.egg-info/PKG-INFO"]
    assert [d for d in dropped if not dockerignored(d, patterns)] == []


def test_readme_says_how_to_build_push_apply_and_what_was_not_run():
    text = (DOCKER / "README.md").read_text()
    for needle in ("docker build -f docker/Dockerfile", "docker push", "kubectl apply -f docker/kuberay/storage.yaml",
                   "kubectl create -f docker/kuberay/rayjob-pipeline.yaml", "ray up docker/cluster.yaml",
                   "/mnt/shared/results", "never built"):
        assert needle in text, needle


# ----------------------------------------------------------------------------- (d) install.sh


def _fresh_venv(tmp_path: Path) -> Path:
    """A new venv of the base interpreter whose only view of installed packages is a link farm of
    this test venv's site-packages minus TrueFace itself: the pinned wheels (torch, Ray, ...) are
    already there, so pip downloads nothing, and the project must really be installed by install.sh."""
    venv = tmp_path / "venv"
    base = Path(getattr(sys, "_base_executable", "") or Path(sys.base_prefix) / "bin" / "python3").resolve()
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site_packages,) = (venv / "lib").glob("python3.*/site-packages")
    farm = tmp_path / "site-packages-view"
    farm.mkdir()
    current = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).resolve().is_relative_to(Path(sys.prefix).resolve())))
    for entry in current.iterdir():
        if "trueface" not in entry.name.lower() and not entry.name.endswith(".pth"):
            (farm / entry.name).symlink_to(entry)
    (site_packages / "_test_view.pth").write_text(f"{farm}\n")
    return venv


def _source_copy(tmp_path: Path) -> Path:
    """The files a checkout holds, copied: pip builds in the source folder (build/, *.egg-info),
    which must not happen in the repository other people are working in."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("trueface", "jobs", "search_spaces", "docker"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    return src


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_sh_installs_the_project_into_a_fresh_venv(tmp_path):
    venv = _fresh_venv(tmp_path)
    src = _source_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), PYTHONNOUSERSITE="1",
               PIP_NO_INDEX="1",  # any download attempt fails the test instead of fetching GBs
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_CONFIG_FILE=os.devnull)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*cmd: str, cwd: Path = elsewhere) -> str:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{shlex.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    site = run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    assert Path(site).resolve().is_relative_to(venv.resolve())
    no_project = subprocess.run(["python", "-c", "import trueface"], cwd=elsewhere, env=env, capture_output=True)
    assert no_project.returncode != 0, "the fresh venv must not see TrueFace before install.sh"

    # The default: SRC is the repository the script sits in, run from another directory.
    out = run("bash", str(src / "docker" / "install.sh"))
    assert "trueface importable from" in out
    check = "import jobs.tune, trueface; print(trueface.__file__); print(jobs.tune.__file__)"
    files = [Path(p) for p in run("python", "-c", check).split()]
    assert all(f.resolve().is_relative_to(Path(site).resolve()) for f in files), files

    # The Dockerfile's steps: dependencies only (all satisfied here: pip must not need the index),
    # then the editable install, with which `--space paper` resolves from any directory.
    run("bash", str(src / "docker" / "install.sh"), "--deps-only", str(src))
    run("bash", str(src / "docker" / "install.sh"), "--editable", str(src))
    files = [Path(p) for p in run("python", "-c", check).split()]
    assert all(f.resolve().is_relative_to(src.resolve()) for f in files), files
    root = write_tiny_root(tmp_path / "data", {"140k-real-vs-fake": "upper", "dalle": "lower"}, per_class=2)
    out = run("python", "-m", "jobs.tune", "--space", "paper", "--config", "paper", "--stage", "both",
              "--data-root", str(root), "--storage", str(tmp_path / "tune"), "--num-samples", "2", "--dry-run",
              "stage1.samples_per_epoch=100000", "stage2.samples_per_epoch=24000")  # paper-sized epochs
    assert f"space {src / 'search_spaces' / 'paper.yaml'}" in out

    bad = subprocess.run(["bash", str(src / "docker" / "install.sh"), str(tmp_path / "nowhere")],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no pyproject.toml" in bad.stderr


def test_gpu_check_runs_the_benchmark_under_its_timeout_and_passes_its_status_on(tmp_path):
    # stand-ins on PATH: `timeout` records its arguments and exits as the benchmark would have
    # (124: stopped), no nvidia-smi; the script's own logic (limit, arguments, status) is what runs
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "timeout").write_text('#!/bin/sh\necho "$@" >> "$CALLS"\nexit "$EXIT_WITH"\n')
    (bin_dir / "timeout").chmod(0o755)
    calls = tmp_path / "calls"

    def check(*args: str, exit_with: int) -> subprocess.CompletedProcess:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls), "EXIT_WITH": str(exit_with),
               "PYTHON": "py", "OUT": str(tmp_path / "out")}
        return subprocess.run(["bash", str(DOCKER / "gpu_check.sh"), *args], env=env, capture_output=True, text=True)

    plain, compiled = check("--trace", exit_with=1), check("--data-root", "d", "--compile", exit_with=124)
    out = str(tmp_path / "out")
    assert calls.read_text().splitlines() == [f"360 py -m jobs.benchmark gpu --results-dir {out} --trace",
                                              f"540 py -m jobs.benchmark gpu --results-dir {out} --data-root d --compile"]
    assert (plain.returncode, compiled.returncode) == (1, 124)
    assert "nvidia-smi not found" in plain.stdout and "ran past" not in plain.stderr
    assert f"ran past 540 s and was stopped; the stages it finished are in {out}/bench-gpu/" in compiled.stderr
