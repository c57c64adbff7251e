"""Every effx module imports without the optional heavy dependencies, and the CLI starts without them."""

import subprocess
import sys

CODE = r"""
import importlib, pkgutil, sys
import effx
names = ["effx"]
for pkg in ("effx", "effx.models", "effx.exporter", "effx.plugins", "effx.targets"):
    mod = importlib.import_module(pkg)
    names += [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".")]
for name in sorted(set(names)):
    importlib.import_module(name)
heavy = [m for m in ("tensorrt", "transformers", "matplotlib", "modelopt", "triton") if m in sys.modules]
print("IMPORTED", len(names), "HEAVY", heavy)
"""


def test_all_modules_import_without_optional_dependencies():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("IMPORTED"))
    assert line.endswith("HEAVY []"), line


def test_cli_help_starts_fast_without_torch():
    code = "import sys; from effx.cli import app; sys.argv=['effx','--help']\n" \
           "try:\n    app()\nexcept SystemExit: pass\nprint('TORCH', 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "TORCH False" in proc.stdout, proc.stderr[-1000:]
