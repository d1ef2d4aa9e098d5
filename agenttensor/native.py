"""Native CPU kernels: C++ sources built into shared libraries on first use and called through ctypes.

`build` compiles a source once per source, flags and torch version; `load` adds the switch and the fallback:
``AGENTTENSOR_NATIVE_KERNELS=0`` turns compute kernels off, and without a C++ compiler (``$CXX``, ``c++`` or
``g++``) they are skipped with one logged warning, so callers keep a torch-ops path for both cases (and for
other devices). Users: `_group_kernels` (group sums and gathers), the covid model's shadow-flow backward
(models/covid/csrc) and `_cpu_cache` (the caching allocator, which links against torch's c10). Libraries are
cached under ``$AGENTTENSOR_CACHE_DIR`` (default ``~/.cache/agenttensor``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")


def build(source: Path, name: str, with_torch: bool = False, flags: tuple[str, ...] = ("-O2",)) -> Path:
    """Compile ``source`` into ``lib<name>_<hash>.so`` (the hash covers the source, flags and torch build)
    and return its path; an existing build is reused. Raises RuntimeError without a compiler or on errors."""
    torch_dir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # shared headers (-I CSRC)
    key = hashlib.sha256(source.read_bytes() + headers
                         + f"{flags}|{with_torch}|{torch.__version__}|{abi}|{torch_dir}".encode())
    cache = Path(os.environ.get("AGENTTENSOR_CACHE_DIR", Path.home() / ".cache" / "agenttensor"))
    target = cache / f"lib{name}_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ / g++) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{CSRC}"]
        if with_torch:
            cmd += [f"-I{torch_dir / 'include'}", str(source), f"-L{torch_dir / 'lib'}", "-lc10",
                    f"-Wl,-rpath,{torch_dir / 'lib'}"]
        else:  # OpenMP: the libgomp torch ships and has loaded (same soname), so torch's thread pool runs the loops
            cmd += [str(source), "-fopenmp", f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}"]
        done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {done.stderr.strip()[-800:]}")
        os.replace(out, target)  # atomic: concurrent processes build the same file
    return target


def _compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else ``c++`` or ``g++`` on PATH, else None."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


_loaded: dict[str, ctypes.CDLL | None] = {}


def status() -> dict[str, bool]:
    """Each compute-kernel library this process has asked for (`load`): whether it built and loaded. A benchmark
    records it: a source that failed to compile falls back to torch ops with one warning, slower but correct."""
    return {name: library is not None for name, library in _loaded.items()}


# os.environ's own mapping on POSIX (bytes keys): a read without os.environ's per-call encoding, which made the
# kernels' ~7 checks a day 3 % of a 2,000-agent day's instructions (callgrind)
_ENVIRON = os.environ._data if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict) else None


def kernels_enabled() -> bool:
    """False where ``AGENTTENSOR_NATIVE_KERNELS=0`` (read at every call: tests and benchmarks switch it)."""
    if _ENVIRON is not None:
        value = _ENVIRON.get(b"AGENTTENSOR_NATIVE_KERNELS")
        return value is None or value.strip() != b"0"
    return os.environ.get("AGENTTENSOR_NATIVE_KERNELS", "1").strip() != "0"


def vector_flags(cpu_flags: list[str] | None = None, vendor: str | None = None) -> tuple[str, ...]:
    """The widest vector instructions this CPU has (``cpu_flags``, default: from /proc/cpuinfo): AVX-512 (F, BW, VL,
    DQ, 512-bit vectors preferred), else ``-mavx2 -mfma``, else nothing (SSE2 code). The flags are part of a build's
    cache key, so a machine without them never loads a build made with them. No fused multiply-adds either way (the
    kernels are built with ``-ffp-contract=off`` where their numbers must be the torch ops'), so the width changes no
    result: per-element arithmetic is the same, and sums keep their written order. AVX-512: full-NYC transition backward
    64 → 56 ms per day, the gradient day ~4 % faster (in-process A/B, identical gradients).

    On Sapphire and Emerald Rapids (AVX512-FP16: their vector gathers are fast) also ``-mtune=sapphirerapids``:
    GCC's generic tuning emulates every gather (``table[slot[i]]``, the kernels' per-agent table reads) with scalar
    loads and inserts. Full NYC, in-process A/B, 6 alternating pairs of 7-day runs: backward 206.5 → 195.7 ms/day,
    gradient forward 127.8 → 121.3, hard forward 98.6 → 97.4 (medians); the same gradient bits.

    On AMD CPUs with AVX-512 (``vendor`` AuthenticAMD: Zen 4, Zen 5; measured on Zen 5) also ``-DAGENTTENSOR_ZEN``:
    the kernels' AVX-512 paths were tuned on Intel, and on Zen 5 some lose to their AVX2 twins (its vector gathers are
    slower than scalar loads; longer tiles pay). The kernels take their Zen choices under that macro (the own
    contributions' backward at full NYC: 37.8 → 25.4 ms per call in a per-call A/B, the same numbers;
    benchmarks/HISTORY.md, thirty-sixth round). ``vendor``: /proc/cpuinfo's ``vendor_id`` where ``cpu_flags`` is read
    from there too, else unknown unless given."""
    flags = cpu_flags
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                lines = f.read().splitlines()
        except OSError:
            return ()
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        if vendor is None:
            vendor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")
    if not ("avx2" in flags and "fma" in flags):
        return ()
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        wide = ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512")
        if vendor == "AuthenticAMD":
            return (*wide, "-DAGENTTENSOR_ZEN")
        fast_gathers = "avx512_fp16" in flags and _compiler_accepts("-mtune=sapphirerapids")
        return (*wide, "-mtune=sapphirerapids") if fast_gathers else wide
    return ("-mavx2", "-mfma")


_accepted: dict[str, bool] = {}


def _compiler_accepts(flag: str) -> bool:
    """Whether the C++ compiler takes ``flag`` (e.g. a -mtune target an older compiler does not know); once per
    process."""
    if flag not in _accepted:
        compiler = _compiler()
        try:
            done = subprocess.run([compiler, flag, "-x", "c++", "-fsyntax-only", "-"], input="", capture_output=True,
                                  text=True, timeout=60) if compiler else None
            _accepted[flag] = done is not None and done.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _accepted[flag] = False
    return _accepted[flag]


def load(source: Path, name: str, declare: Callable[[ctypes.CDLL], None],
         flags: tuple[str, ...] = ("-O3",)) -> ctypes.CDLL | None:
    """The built library of a compute-kernel source (with `vector_flags`) with its functions declared
    (``declare(library)`` sets argtypes), or None where kernels are switched off or cannot be built (one
    warning per source)."""
    if not kernels_enabled():
        return None
    if name not in _loaded:
        try:
            library = ctypes.CDLL(str(build(source, name, flags=(*flags, *vector_flags()))))
            declare(library)
            _loaded[name] = library
        except Exception as e:  # no compiler, unexpected platform
            _loaded[name] = None
            log.warning("native kernels %s unavailable (%s); using torch ops", source.name, e)
    return _loaded[name]


# MKL's vector-math mode torch's CPU exp calls vmsExp with (aten/src/ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF |
# VML_ERRMODE_IGNORE
_VML_TORCH_MODE = 0x2 | 0x140000 | 0x100


class TorchExp(NamedTuple):
    """Torch's own float32 exp on CPU for native kernels (`torch_exp`): MKL's ``vmsExp(n, a, r, mode)`` at ``mode``,
    and ``MKL_Set_Num_Threads_Local(n)``, which a kernel's threads set to 1 around their calls (else each call asks
    MKL's threading layer whether to fork a team: microseconds a call)."""

    function: int  # address
    mode: int
    local_threads: int  # address


_torch_exp: TorchExp | None | bool = False  # None: unavailable; False: not looked up yet


def torch_exp() -> TorchExp | None:
    """`TorchExp` where a kernel calling it gives the bits of torch's float32 ``exp`` on CPU (checked once per process
    against ``torch.exp`` on values that cover the hazards' range, denormal results, 0 and the overflow edge), else
    None: a torch build without MKL, or one whose exp is not MKL's. Kernels then take exp(x) made by torch, so their
    numbers never depend on which."""
    global _torch_exp
    if _torch_exp is False:
        _torch_exp = None
        try:
            library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
            function, local_threads = library.vmsExp, library.MKL_Set_Num_Threads_Local
            function.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            generator = torch.Generator().manual_seed(0)
            x = torch.cat([-torch.rand(1 << 16, generator=generator) * torch.rand(1 << 16, generator=generator) * 20,
                           -torch.rand(4096, generator=generator) * 1e-6, torch.linspace(-110.0, 90.0, 8191),
                           torch.tensor([0.0, -0.0, 88.72, 88.73, -87.0, -103.0, -104.0, float("inf"), -float("inf")])])
            out = torch.empty_like(x)
            function(x.numel(), x.data_ptr(), out.data_ptr(), _VML_TORCH_MODE)
            if torch.equal(out.view(torch.int32), x.exp().view(torch.int32)):
                address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
                _torch_exp = TorchExp(address(function), _VML_TORCH_MODE, address(local_threads))
            else:
                log.info("torch's exp is not MKL's vmsExp here: kernels take exp from torch")
        except (OSError, AttributeError):  # no such library or symbol
            pass
    return _torch_exp
