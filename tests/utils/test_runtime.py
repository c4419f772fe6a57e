"""Process-level malloc tuning used by the CLI: opt-out, idempotence, and a real effect on glibc."""
import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from hedgehog.utils import runtime


def test_opt_out_env_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("HEDGEHOG_MALLOC_TUNING", "0")
    monkeypatch.setattr(runtime, "_applied", None)
    assert runtime.keep_freed_memory() is False
    assert runtime._applied is None  # nothing was attempted


@pytest.mark.skipif(sys.platform != "linux" or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="mallopt tuning is glibc-only")
def test_tuning_keeps_a_freed_block_in_the_process():
    """In fresh processes: a 64 MB block that was written and freed goes back to the OS by default (glibc
    serves it with mmap), and stays in the process (reusable without page faults) once tuned."""
    code = textwrap.dedent("""
        import ctypes, sys
        from hedgehog.utils.runtime import keep_freed_memory
        if sys.argv[1] == "1":
            assert keep_freed_memory() and keep_freed_memory()  # idempotent
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        def rss_kb():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
        n = 64 << 20
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        before = rss_kb()
        libc.free(p)
        print(before - rss_kb())  # KB handed back to the OS by free()
    """)
    env = {**os.environ, "HEDGEHOG_MALLOC_TUNING": "1"}
    run = lambda flag: int(subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True,
                                          env=env, check=True).stdout.split()[-1])
    assert run("0") > 60_000  # the whole 64 MB returned
    assert run("1") < 1_000  # kept


def test_benchmarks_run_as_a_library_caller_gets_them(tmp_path):
    """`hedgehog bench attention` leaves malloc alone (as a library caller's process) and still times the fused
    CPU kernel; other commands keep the tuning."""
    code = textwrap.dedent("""
        import json, sys
        from hedgehog.cli import main
        from hedgehog.utils import runtime
        assert main(["bench", "attention", "--lengths", "256", "--no-backward", "--no-memory", "--repeats", "1",
                     "--out", sys.argv[1]]) == 0
        rows = json.load(open(sys.argv[1] + "/attention.json"))
        print("RESULT", runtime._applied, rows["config"]["forward_kernel"])
    """)
    env = {**os.environ, "HEDGEHOG_MALLOC_TUNING": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         check=True).stdout
    applied, kernel = out.split("RESULT")[-1].split()
    assert applied == "None"
    from hedgehog.ops import cpu_kernel

    assert kernel == ("fused-cpu" if cpu_kernel.load() is not None else "torch")
