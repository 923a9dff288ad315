"""seg_core stays pure: importing every module pulls in neither ray nor any network client."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import seg_core

FORBIDDEN = ("ray", "s3fs", "boto3", "botocore", "fsspec", "requests", "urllib3")


def _modules() -> list[str]:
    return [f"seg_core.{m.name}" for m in pkgutil.iter_modules(seg_core.__path__)]


def test_seg_core_modules_exist():
    names = _modules()
    for expected in ("seg_core.model", "seg_core.losses", "seg_core.metrics", "seg_core.codecs",
                     "seg_core.tiling", "seg_core.artifact", "seg_core.inference"):
        assert expected in names


def test_importing_seg_core_never_imports_ray_or_network_clients():
    code = (
        "import importlib, sys\n"
        f"for name in {_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"seg_core pulled in: {out.stdout.strip()}"


def test_seg_core_source_has_no_ray_import():
    import pathlib

    root = pathlib.Path(seg_core.__file__).parent
    offenders = [
        str(p) for p in root.rglob("*.py")
        if any(line.strip().startswith(("import ray", "from ray")) for line in p.read_text().splitlines())
    ]
    assert offenders == []
