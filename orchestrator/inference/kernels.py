"""The engine's native CPU kernel: decode attention over the paged KV cache (paged_attention.c).

It reads each sequence's keys and values where they lie in the cache, where the portable path
first gathers them block by block into a padded copy and then runs scaled_dot_product_attention
over it (two passes over memory: measured 2x slower for the 12M model at 32 sequences here).
No library this project can install provides a CPU paged attention for its torch release.

Built at first use with the machine's C compiler (``$CC``, else ``cc`` or ``gcc``; OpenMP from
the libgomp torch already loaded) into ``$FORGELINE_KERNEL_CACHE`` (default
``~/.cache/forgeline/kernels``), one file per source, flags and compiler, written whole and
renamed into place so that replicas starting together are safe; loaded through ctypes, which
releases the GIL during the call. Where it cannot be built the engine keeps the portable path and
says why (``unavailable_reason``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")
# -march=native: the file is built on the machine that runs it. -fno-math-errno lets the
# exponentials go through glibc's vector expf.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
COMPILE_TIMEOUT_S = 120

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
unavailable_reason = ""


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("FORGELINE_KERNEL_CACHE") or "~/.cache/forgeline/kernels"))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(out_dir: Path | None = None) -> Path:
    """The kernel's shared library, compiled unless a build of this source, flags and compiler
    is there already. Raises RuntimeError saying why it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler ($CC, cc or gcc) on this machine")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the C compiler {cc} does not run: {exc}") from None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), cc, version, platform.machine()])
                         .encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    target = out_dir / f"paged_attention-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".paged_attention-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        os.replace(tmp, target)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{cc} took longer than {COMPILE_TIMEOUT_S} s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def paged_decode_attention():
    """The kernel as a function ``(q, k, v, table, lengths, block_size, out) -> None``, or None
    where it cannot be built or loaded (the reason in ``unavailable_reason``, logged once).

    q: (n, heads, dim) fp32, last axis contiguous; k, v: one layer's cache (slots, kv_heads,
    dim), contiguous; table: (n, width) int64 block ids; lengths: (n,) int64, the positions each
    sequence attends over (0 .. length - 1); out: (n, heads, dim) fp32, contiguous."""
    global unavailable_reason
    if platform.system() != "Linux":
        unavailable_reason = f"built on Linux only (this is {platform.system()})"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as exc:
        unavailable_reason = str(exc)
        log.warning("the native decode attention is unavailable (%s); the engine gathers and uses SDPA", exc)
        return None
    fn = lib.paged_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64,
                   ctypes.c_float, ctypes.c_int, _PTR]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
               block_size: int, out: torch.Tensor) -> None:
        n, heads, dim = q.shape
        if not (q.dtype == k.dtype == v.dtype == out.dtype == torch.float32 and q.stride(2) == 1
                and k.is_contiguous() and v.is_contiguous() and out.is_contiguous() and k.shape == v.shape
                and table.dtype == lengths.dtype == torch.int64 and table.is_contiguous()
                and lengths.is_contiguous() and len(table) == len(lengths) == n and heads % k.shape[1] == 0
                and k.shape[2] == dim and out.shape == q.shape):
            raise ValueError("paged_decode_attention: tensors of the wrong dtype, shape or layout")
        if fn(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0), table.data_ptr(),
              table.shape[1], lengths.data_ptr(), n, heads, k.shape[1], dim, block_size, dim ** -0.5,
              torch.get_num_threads(), out.data_ptr()):
            raise MemoryError("paged_decode_attention: no memory for the scores")

    return attend
