"""The commands' host allocator (fine_jax.allocator): the choice, and the re-exec in a real
process (same PID, the library really mapped)."""
import os
import subprocess
import sys

import pytest

from fine_jax import allocator

PROBE = ("from fine_jax import allocator; allocator.reexec_if_needed(); import os; "
         "maps = open('/proc/self/maps').read(); "
         "print(os.getpid(), 'tcmalloc' in maps, os.environ.get('GLIBC_TUNABLES', ''), "
         "allocator.active(), sep=';')")
CLEAN = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", allocator.ACTIVE_ENV, allocator.ENV)}


def probe(**env):
    proc = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(CLEAN, **env))
    out, err = proc.communicate(timeout=60)
    return proc, out.strip(), err.strip()


def test_plan_prefers_tcmalloc_then_huge_pages(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "glibc_has_hugetlb", lambda: True)
    what, changes = allocator.plan({"LD_PRELOAD": "/x/libfoo.so"})
    assert what.startswith("tcmalloc")
    assert changes["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4 /x/libfoo.so"
    what, changes = allocator.plan({allocator.ENV: "hugepages", "GLIBC_TUNABLES": "a.b=1"})
    assert changes == {"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=1"}
    assert allocator.plan({allocator.ENV: "system"}) == ("system malloc", {})
    # already under a caching allocator, or already re-executed: left alone
    assert allocator.plan({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})[1] == {}
    assert allocator.plan({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})[1] == {}
    assert allocator.plan({allocator.ACTIVE_ENV: "tcmalloc (/x)"}) == ("tcmalloc (/x)", {})
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.plan({})[1] == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    monkeypatch.setattr(allocator, "glibc_has_hugetlb", lambda: False)
    assert allocator.plan({})[1] == {}


def test_impossible_choices_name_the_fix(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(allocator, "glibc_has_hugetlb", lambda: False)
    with pytest.raises(allocator.AllocatorError, match="libtcmalloc-minimal4"):
        allocator.plan({allocator.ENV: "tcmalloc"})
    with pytest.raises(allocator.AllocatorError, match="glibc 2.35"):
        allocator.plan({allocator.ENV: "hugepages"})
    with pytest.raises(allocator.AllocatorError, match="use one of auto, tcmalloc"):
        allocator.plan({allocator.ENV: "fast"})


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD and glibc tunables are Linux's")
def test_a_command_re_executes_itself_once_with_the_same_pid():
    proc, out, err = probe()
    assert proc.returncode == 0, err
    pid, mapped, tunables, what = out.split(";")
    assert int(pid) == proc.pid  # exec, not a child process
    if allocator.find_tcmalloc():
        assert mapped == "True" and what.startswith("tcmalloc"), out
    elif allocator.glibc_has_hugetlb():
        assert "glibc.malloc.hugetlb=1" in tunables and "huge pages" in what, out
    if allocator.glibc_has_hugetlb():
        proc, out, err = probe(**{allocator.ENV: "hugepages"})
        pid, mapped, tunables, what = out.split(";")
        assert int(pid) == proc.pid and mapped == "False", out
        assert tunables == "glibc.malloc.hugetlb=1" and what == "glibc with huge pages", out
    # the system allocator: no re-exec, nothing preloaded
    proc, out, err = probe(**{allocator.ENV: "system"})
    assert proc.returncode == 0, err
    assert out.split(";")[1:] == ["False", "", "system malloc"], out
    proc, out, err = probe(**{allocator.ENV: "bogus"})
    assert proc.returncode == 2 and err.startswith("config error: FINE_JAX_ALLOCATOR='bogus'")


RELEASE_PROBE = """
import ctypes
from fine_jax import allocator
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def rss_mib():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
blocks = [libc.malloc(4096) for _ in range(100_000)]  # 400 MiB in small blocks, as a compiler
for b in blocks:                                      # leaves them: kept by the allocator
    libc.memset(b, 1, 4096)
pin = libc.malloc(100_000)  # above them (from the top), in use: the heap cannot shrink
for b in blocks:
    libc.free(b)
before = rss_mib()
which = allocator.release_free_memory()
print(which, round(before), round(rss_mib()), sep=';')
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("preload", ["glibc", "tcmalloc"])
def test_release_free_memory_returns_freed_heap_to_the_system(preload):
    env = dict(CLEAN)
    if preload == "tcmalloc":
        lib = allocator.find_tcmalloc()
        if lib is None:
            pytest.skip("no tcmalloc installed")
        env["LD_PRELOAD"] = lib
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    which, before, after = out.stdout.strip().splitlines()[-1].split(";")
    assert which == ("MallocExtension_ReleaseFreeMemory" if preload == "tcmalloc"
                     else "malloc_trim")
    assert int(before) - int(after) > 300, (before, after)  # most of the 400 MiB went back
