"""Build the C++ sources under agenttensor/csrc into shared libraries, once per source and torch version.

Used by `_cpu_cache` (the caching allocator: links against torch's c10) and `_group_kernels` (plain loops, no
torch headers). Libraries are cached under ``$AGENTTENSOR_CACHE_DIR`` (default ``~/.cache/agenttensor``);
building needs a C++ compiler (``$CXX``, ``c++`` or ``g++``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")


def build(source: Path, name: str, with_torch: bool = False, flags: tuple[str, ...] = ("-O2",)) -> Path:
    """Compile ``source`` into ``lib<name>_<hash>.so`` (the hash covers the source, flags and torch build)
    and return its path; an existing build is reused. Raises RuntimeError without a compiler or on errors."""
    torch_dir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    key = hashlib.sha256(source.read_bytes() + f"{flags}|{with_torch}|{torch.__version__}|{abi}|{torch_dir}".encode())
    cache = Path(os.environ.get("AGENTTENSOR_CACHE_DIR", Path.home() / ".cache" / "agenttensor"))
    target = cache / f"lib{name}_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ / g++) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        if with_torch:
            cmd += [f"-I{torch_dir / 'include'}", str(source), f"-L{torch_dir / 'lib'}", "-lc10",
                    f"-Wl,-rpath,{torch_dir / 'lib'}"]
        else:
            cmd += [str(source), "-pthread"]
        done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {done.stderr.strip()[-800:]}")
        os.replace(out, target)  # atomic: concurrent processes build the same file
    return target
