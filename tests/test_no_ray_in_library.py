"""trueface/ is plain PyTorch: Ray lives in jobs/ only."""

import ast
import subprocess
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "trueface"


def test_no_module_of_the_library_imports_ray():
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not offenders, offenders


def test_importing_every_module_loads_no_ray():
    modules = sorted(
        ".".join(p.relative_to(LIBRARY.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in LIBRARY.rglob("*.py")
    )
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(any(k == 'ray' or k.startswith('ray.') for k in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
