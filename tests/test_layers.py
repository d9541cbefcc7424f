"""The layers: trueface/ is plain PyTorch (Ray lives in jobs/ only), and trueface/config/ is the
bottom layer, importing nothing else of trueface."""

import ast
import subprocess
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "trueface"


def _imports(path: Path) -> list[str]:
    """Every module name an import statement of ``path`` names (function-level imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_no_module_of_the_library_imports_ray():
    offenders = [f"{path}: {n}" for path in LIBRARY.rglob("*.py") for n in _imports(path)
                 if n == "ray" or n.startswith("ray.")]
    assert not offenders, offenders


def test_config_imports_nothing_above_it():
    """Every module reads the config; a config that imported data or metrics code would tie the
    bottom layer to the layers above it (and invite import cycles)."""
    offenders = [f"{path.name}: {n}" for path in (LIBRARY / "config").rglob("*.py") for n in _imports(path)
                 if n.startswith("trueface.") and not n.startswith("trueface.config")]
    assert not offenders, offenders


def test_importing_every_module_loads_no_ray():
    modules = sorted(
        ".".join(p.relative_to(LIBRARY.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in LIBRARY.rglob("*.py")
    )
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(any(k == 'ray' or k.startswith('ray.') for k in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
