"""The host memory allocator of fine_jax's commands.

XLA on CPU allocates each step's temporary buffers afresh: 3.75 GB per stage-1 step at the
reference size, 119 MB at the tiny one. glibc serves every allocation over 32 MB with a new
``mmap`` and unmaps it when freed, so each step touches fresh 4 KiB pages: about 940,000 page
faults per reference-size step, each zero-filling a page. A caching allocator (tcmalloc) reuses
the freed memory instead; glibc's own ``glibc.malloc.hugetlb`` tunable (glibc 2.35 and later)
backs the same allocations with 2 MiB pages, 512 times fewer faults.

Both must be in place before the process starts, so the commands (``python -m fine_jax.train``,
``python -m fine_jax.evaluate``, the benchmarks) re-execute themselves once, before importing
JAX, with the same PID and arguments:

1. ``LD_PRELOAD=<libtcmalloc>`` when a tcmalloc library is installed (Debian and Ubuntu:
   ``apt-get install libtcmalloc-minimal4``), else
2. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` on Linux with glibc 2.35 or later, else
3. nothing.

``FINE_JAX_ALLOCATOR`` chooses: ``auto`` (the default, the order above), ``tcmalloc``,
``hugepages`` or ``system`` (leave the process as it started). A process that already preloads
tcmalloc or jemalloc, or already sets the hugetlb tunable, is left alone.
"""
from __future__ import annotations

import os
import platform
import sys

ENV = "FINE_JAX_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "hugepages", "system")
# Set in the re-executed process: what it runs with, and the guard against a second re-exec.
ACTIVE_ENV = "FINE_JAX_ALLOCATOR_ACTIVE"
HUGETLB = "glibc.malloc.hugetlb=1"
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so",
                   "libtcmalloc.so")


class AllocatorError(ValueError):
    """``FINE_JAX_ALLOCATOR`` names an allocator this machine does not have, or no allocator."""


def find_tcmalloc() -> str | None:
    """The path of an installed tcmalloc library, or None. Only files that exist count (the
    linker cache can name a library that is gone, and a preload that fails to load is skipped)."""
    prefixes = [os.environ.get("CONDA_PREFIX"), sys.prefix]
    dirs = [os.path.join(p, "lib") for p in prefixes if p] + list(_LIB_DIRS)
    for d in dirs:
        for name in _TCMALLOC_NAMES:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def glibc_has_hugetlb() -> bool:
    """Linux with glibc >= 2.35, the first with the ``glibc.malloc.hugetlb`` tunable."""
    if sys.platform != "linux":
        return False
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return False
    major, minor = (int(x) for x in version.split(".")[:2])
    return (major, minor) >= (2, 35)


def already_tuned(env) -> str | None:
    """What the environment already gives the process, or None."""
    if env.get(ACTIVE_ENV):
        return env[ACTIVE_ENV]
    preload = env.get("LD_PRELOAD", "")
    for lib in ("tcmalloc", "jemalloc", "mimalloc"):
        if lib in preload:
            return f"{lib} (LD_PRELOAD)"
    if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return "glibc with huge pages (GLIBC_TUNABLES)"
    return None


def plan(env) -> tuple[str, dict]:
    """(description, environment changes) for ``env``; no changes means run as is."""
    choice = env.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV}={env[ENV]!r}: use one of {', '.join(CHOICES)}")
    if choice == "system":
        return "system malloc", {}
    done = already_tuned(env)
    if done:
        return done, {}
    if choice in ("auto", "tcmalloc"):
        lib = find_tcmalloc()
        if lib:
            preload = " ".join(filter(None, [lib, env.get("LD_PRELOAD", "")]))
            # tcmalloc reports every allocation over 1 GiB on stderr; a reference-size step
            # makes several each step.
            return f"tcmalloc ({lib})", {"LD_PRELOAD": preload,
                                         "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}
        if choice == "tcmalloc":
            raise AllocatorError(f"{ENV}=tcmalloc, but no tcmalloc library is installed: install "
                                 "one (apt-get install libtcmalloc-minimal4) or set "
                                 f"{ENV}=auto")
    if glibc_has_hugetlb():
        tunables = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), HUGETLB]))
        return "glibc with huge pages", {"GLIBC_TUNABLES": tunables}
    if choice == "hugepages":
        raise AllocatorError(f"{ENV}=hugepages needs Linux with glibc 2.35 or later "
                             f"(this is {sys.platform}, {' '.join(platform.libc_ver())}); set "
                             f"{ENV}=auto")
    return "system malloc (no tcmalloc, glibc without the hugetlb tunable)", {}


def reexec_if_needed() -> None:
    """Re-executes this process (same PID, same arguments) with the allocator of :func:`plan`;
    returns when there is nothing to change. Call it before anything else: nothing of the
    present process survives the exec."""
    try:
        what, changes = plan(os.environ)
    except AllocatorError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if not changes:
        os.environ.setdefault(ACTIVE_ENV, what)
        return
    env = dict(os.environ, **changes)
    env[ACTIVE_ENV] = what
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def active() -> str:
    """The allocator this process runs with, for the job's header line."""
    return os.environ.get(ACTIVE_ENV) or already_tuned(os.environ) or "system malloc"


def release_free_memory() -> str:
    """Returns the heap's free pages to the operating system; says which allocator did.

    Compiling a step leaves the compiler's freed memory (about 0.8 GiB at the reference size) in
    the allocator's free lists, and the step's large buffers, each its own mapping, do not reuse
    it: it would sit under every step's peak. The trainer and the benchmarks call this once the
    step is compiled. tcmalloc: ``MallocExtension_ReleaseFreeMemory``; glibc: ``malloc_trim``;
    elsewhere nothing."""
    import ctypes

    try:
        lib = ctypes.CDLL(None)
    except OSError:
        return "none"
    for name, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn(*args)
            return name
    return "none"
