"""Process-level malloc tuning used by the CLI: opt-out, idempotence, and a real effect on glibc."""
import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from hedgehog import runtime


def test_opt_out_env_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("HEDGEHOG_MALLOC_TUNING", "0")
    monkeypatch.setattr(runtime, "_applied", None)
    assert runtime.keep_freed_memory() is False
    assert runtime._applied is None  # nothing was attempted


@pytest.mark.skipif(sys.platform != "linux" or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="mallopt tuning is glibc-only")
def test_tuning_stops_page_faults_on_reallocation():
    """In fresh processes: repeated causal linear-attention calls (N=4096) page-fault on every call's
    fresh blocks by default, and (almost) never once freed memory is kept."""
    code = textwrap.dedent("""
        import resource, sys, torch
        from hedgehog.feature_maps import get_feature_map
        from hedgehog.ops import feature_linear_attention
        from hedgehog.runtime import keep_freed_memory
        if sys.argv[1] == "1":
            assert keep_freed_memory() and keep_freed_memory()  # idempotent
        x = torch.randn(1, 8, 4096, 64)
        fq, fk = get_feature_map("hedgehog", 64, 8), get_feature_map("hedgehog", 64, 8)
        with torch.no_grad():
            feature_linear_attention(x, x, x, fq, fk)  # warm up
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                feature_linear_attention(x, x, x, fq, fk)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    """)
    env = {**os.environ, "HEDGEHOG_MALLOC_TUNING": "1"}
    run = lambda flag: int(subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,
                                          env=env, check=True).stdout.split()[-1])
    default, tuned = run("0"), run("1")
    assert default > 1000  # measured here: ~17k faults (4 KB pages) for 5 calls
    assert tuned < default / 10  # measured here: 0
