"""What TrueFace loads cannot run code: pickles with a payload are refused in TrueFace's words, and
every loader in the sources is a safe one (a static check over the code).

Usage::

    .venv/bin/pytest -q tests/test_security.py
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from trueface.checkpoint import CheckpointError, load_checkpoint
from trueface.model import WeightsError, load_weights_file

REPO = Path(__file__).resolve().parents[1]
TORCH_TEXT = ("Weights only load failed", "WeightsUnpickler", "Traceback")


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _trueface_state() -> dict:
    return {"model": {"w": torch.arange(64.0)}, "ema": {"w": torch.arange(64.0)}, "stage": 1,
            "config": {"run_name": "x"}}


def _assert_ours(exc: BaseException) -> str:
    message = str(exc)
    assert not any(text in message for text in TORCH_TEXT), message
    assert exc.__cause__ is not None  # torch's error stays chained for whoever debugs it
    return message


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    torch.save({**_trueface_state(), "model": _Payload(marker)}, path)
    return path, marker


def test_checkpoint_with_a_payload_is_refused_without_running_it(payload):
    path, marker = payload
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = _assert_ours(info.value)
    assert message.startswith(f"refused {path}: it holds Python objects other than tensors and plain values")
    assert f"{os.system.__module__}.system" in message  # names what it would have called
    assert "so it is not a TrueFace checkpoint" in message
    assert "torch.save(model.state_dict(), path)" in message
    assert not marker.exists()


def test_weights_file_with_a_payload_is_refused_without_running_it(payload):
    path, marker = payload
    with pytest.raises(WeightsError) as info:
        load_weights_file(nn.Linear(64, 1), path)
    message = _assert_ours(info.value)
    assert message.startswith(f"refused {path}: it holds Python objects other than tensors")
    assert "weights_only=True" in message
    assert not marker.exists()


def test_bare_pickle_with_a_payload_is_refused(tmp_path: Path):
    marker, path = tmp_path / "pwned", tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))  # torch.save's protocol
    with pytest.raises(CheckpointError, match=r"^refused .*weights\.pkl: it holds Python objects") as info:
        load_checkpoint(path)
    _assert_ours(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_checkpoint_is_not_readable(tmp_path: Path, zip_format: bool):
    whole, cut = tmp_path / "whole.pt", tmp_path / "cut.pt"
    torch.save(_trueface_state(), whole, _use_new_zipfile_serialization=zip_format)
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(cut)
    message = _assert_ours(info.value)
    assert message.startswith(f"{cut} is not a readable TrueFace checkpoint: the file is truncated or not a torch file")
    with pytest.raises(WeightsError, match=r"cut\.pt is not a readable weights file .*truncated"):
        load_weights_file(nn.Linear(64, 1), cut)
    assert torch.equal(load_checkpoint(whole)["ema"]["w"], torch.arange(64.0))  # the uncut file loads


def test_weights_file_that_is_not_a_state_dict(tmp_path: Path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(WeightsError, match=r"tensor\.pt holds a Tensor, not a state dict"):
        load_weights_file(nn.Linear(64, 1), tmp_path / "tensor.pt")


# --- static check: the loaders in the sources ---------------------------------------------------
# Tests are exempt: they read back files they wrote themselves (e.g. test_ddp's per-rank results).
SOURCES = ("trueface/**/*.py", "jobs/**/*.py", ".ci/*.py")
# the config loader's own: a SafeLoader that also refuses duplicate keys (checked below)
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "_StrictLoader"}
UNSAFE_YAML = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ""."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, why) for every call in ``source`` that could unpickle or construct arbitrary objects."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ({"torch", "yaml"} | PICKLERS):
            for alias in node.names:  # a bare load() would hide from the checks below
                if alias.name in ({"load", "loads", "Unpickler"} | UNSAFE_YAML):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        module, _, attr = name.rpartition(".")
        if name in ("torch.load", "torch.serialization.load") and not _is_true(_keyword(node, "weights_only")):
            found.append((node.lineno, f"{name} without weights_only=True"))
        elif module == "yaml" and attr in UNSAFE_YAML:
            found.append((node.lineno, f"{name}"))
        elif module == "yaml" and attr in ("load", "load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).rpartition(".")[2] not in SAFE_YAML_LOADERS:
                found.append((node.lineno, f"{name} without Loader=yaml.SafeLoader"))
        elif module in PICKLERS and attr in ("load", "loads", "Unpickler"):
            found.append((node.lineno, f"{name}: pickle runs code from the file"))
        elif attr == "load" and _is_true(_keyword(node, "allow_pickle")):
            found.append((node.lineno, f"{name}(allow_pickle=True)"))
    return sorted(found)


def test_static_check_catches_unsafe_loads():
    source = "\n".join([
        "import torch, yaml, pickle, numpy as np",
        "torch.load(p)",                                   # 2
        "torch.load(p, weights_only=False)",               # 3
        "torch.load(p, weights_only=flag)",                # 4
        "torch.load(p, map_location='cpu', weights_only=True)",
        "yaml.load(text)",                                 # 6
        "yaml.load(text, Loader=yaml.FullLoader)",         # 7
        "yaml.load(text, Loader=yaml.SafeLoader)",
        "yaml.load(text, yaml.CSafeLoader)",
        "yaml.full_load(text)",                            # 10
        "yaml.safe_load(text)",
        "pickle.loads(blob)",                              # 12
        "np.load(p, allow_pickle=True)",                   # 13
        "from pickle import load",                         # 14
    ])
    assert [line for line, _ in unsafe_loads(source)] == [2, 3, 4, 6, 7, 10, 12, 13, 14]


def test_the_config_loaders_own_yaml_loader_constructs_no_python_objects():
    import yaml

    from trueface.config.loading import _StrictLoader

    assert issubclass(_StrictLoader, yaml.SafeLoader)
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=_StrictLoader)


def test_sources_load_only_safely():
    files = sorted({p for pattern in SOURCES for p in REPO.glob(pattern)})
    assert any(p.name == "checkpoint.py" for p in files)  # the glob found the package
    offending = [f"{p.relative_to(REPO)}:{line}: {why}"
                 for p in files for line, why in unsafe_loads(p.read_text(encoding="utf-8"))]
    assert not offending, "unsafe loading in the sources:\n" + "\n".join(offending)
