"""scripts/benchmark.py's provenance on the CPU: the sources' digest that its table prints beside the commit (a copied
working tree, like the GPU machine's, can carry a stale .git), and `--digest`, which needs no GPU."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_source_digest_follows_the_sources_only(tmp_path):
    bm = _benchmark_module()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "pi0_triton_policy" / "__pycache__").mkdir(parents=True)
    (tmp_path / "kernels" / "a.py").write_text("x = 1\n")
    (tmp_path / "pi0_triton_policy" / "b.py").write_text("y = 2\n")
    first = bm.source_digest(str(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{12}", first) and bm.source_digest(str(tmp_path)) == first
    (tmp_path / "pi0_triton_policy" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\0compiled")
    (tmp_path / "kernels" / "notes.txt").write_text("not a source")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "c.py").write_text("z = 3\n")  # probes and logs are not the engine
    assert bm.source_digest(str(tmp_path)) == first
    (tmp_path / "kernels" / "a.py").write_text("x = 2\n")
    changed = bm.source_digest(str(tmp_path))
    assert changed != first
    (tmp_path / "kernels" / "a.py").rename(tmp_path / "kernels" / "a2.py")  # same bytes, another path
    assert bm.source_digest(str(tmp_path)) not in (first, changed)


def test_digest_flag_prints_the_checkouts_digest_without_a_gpu():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--digest"], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _benchmark_module().source_digest()
