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


def test_profile_timeline_on_fake_kernels():
    """benchmarks/profile_engine.py --graph's timeline arithmetic (the profiler's time ranges are in us): idle time per
    phase is the span minus the union of the kernels' intervals (PDL makes them overlap), and each gap between two
    persistent kernels lists what ran there."""
    spec = importlib.util.spec_from_file_location("profile_engine", REPO / "benchmarks" / "profile_engine.py")
    pe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pe)

    class Range:
        def __init__(self, start, end):
            self.start, self.end = start, end

        def elapsed_us(self):
            return self.end - self.start

    class Kernel:
        def __init__(self, name, start, end):
            self.name, self.time_range = name, Range(start, end)

    kern = [Kernel("_patch_embed_kernel", 0, 10), Kernel("nvjet_vision", 12, 20), Kernel("_embed_tokens_kernel", 20, 22),
            Kernel("_gemm_geglu_kernel", 22, 40), Kernel("_swish_in_kernel", 41, 43), Kernel("mega_chain_kernel", 43, 100),
            Kernel("_action_out_euler_kernel", 95, 104), Kernel("_swish_in_kernel", 104, 106),
            Kernel("mega_chain_kernel", 103, 160)]
    assert pe.union_us([(0, 10), (5, 20), (30, 31)]) == 21 and pe.union_us([]) == 0
    tl = pe.graph_timeline(kern, pe.phase_of([k.name for k in kern]))
    assert tl["wall_us"] == 160 and tl["phases"]["vision"] == {"span_us": 20, "busy_us": 18, "idle_us": 2}
    assert tl["phases"]["action"]["idle_us"] == 0 and tl["step0_us"] == 2 and tl["after_last_mega_us"] == 0
    assert tl["boundaries"] == [{"gap_us": 3, "kernels": [("_action_out_euler_kernel", 9), ("_swish_in_kernel", 2)]}]


def test_mega_probe_bloat_patches_only_the_qkv_unit_and_restores():
    """benchmarks/mega_probe.py --bloat K (the instruction-cache experiment, NOTES.md session 12): K extra mad.lo
    instructions in the kernel source, inside the qkv unit only (P == 0), and K = 0 restores the source exactly."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import mega_probe
        from pi0_triton_policy.kernels import mega_chain as MC

        original = MC._SOURCE
        mega_probe.set_bloat(24)
        src = MC.source(layer=1, attn=2)
        assert src.count("mad.lo.u32") == 24 and "if (P == 0) { unsigned d0 = tid + 0" in src
        mega_probe.set_bloat(0)
        assert MC._SOURCE == original and "mad.lo.u32" not in MC.source(layer=1, attn=2)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
