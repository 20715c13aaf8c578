"""Native CPU kernels of the packed linears, built on this machine at first use.

The C++ sources (``serq_ao/kernels/csrc``) are compiled with torch's C++ extension machinery the
first time a packed linear runs on a CPU (about a minute), into a cache folder keyed by the
sources, torch and Python versions: ``$SERQ_KERNEL_CACHE`` or ``~/.cache/serq_ao/cpu_kernels``.
Nothing built elsewhere is ever loaded. Each instruction-set variant is compiled for its own
target in the same library and the one to run is chosen at run time:

================  ===========================================================================
``avx512_vnni``   AVX-512 (F, BW, VL, DQ) with VNNI: ``vpdpbusd`` int8 dot products
``avx512``        AVX-512 without VNNI: ``vpmaddubsw`` + ``vpmaddwd``
``avx2``          AVX2 and FMA, 256-bit
``portable``      plain C++, any x86-64
``reference``     no native code: the plain-PyTorch reference (:mod:`serq_ao.kernels.reference`)
================  ===========================================================================

``SERQ_CPU_KERNEL`` (one of those, or ``auto``: the best this CPU has) forces one; a path the CPU
lacks is an error naming the variable. Where no compiler is found, the CPU is not x86-64 or
the build fails, the ops run the reference, with one warning saying why.

Numerics (``kernels.inc`` has the detail): the activation codes and scales are bitwise those of
:mod:`serq_ao.formats`; each output is the reference's up to the order of a float32 sum, so
``|native - reference| <= 2 * gamma(K' + 2) * sum_k |a_k| |w_k|`` with ``gamma(n) = n u / (1 - n u)``,
``u = 2**-24`` (:func:`error_bound` computes it; the tests check it on every path).

Prepacked weights (:func:`prepack_weight`): a weight read many times by a long-lived server
(vLLM) can be rearranged once, still 4 bits a value, into the panels the many-row kernel
reads, so that no call unpacks it (``serq_cpu.h`` has the layout). The ``*_panels`` ops take
them and run that kernel for any number of rows, with the same sums in the same order as the
``GEMM_PREFILL`` kernel on the codes as stored: bitwise its outputs. The layout is that of one
instruction-set path's vectors (:func:`panel_columns`: 32 output columns for AVX-512, 16 for
AVX2; the portable path has none).

Float activations times int8 weights (:func:`linear_int8_weights`, a tied LM head or embedding
table stored as int8 with one float scale per row): the codes are exact as floats and each output
is one float32 sum, so ``|native - exact| <= gamma(K + 2) (scale_n sum_k |x_k| |q_k| + |bias_n|)``
(:func:`int8_weights_error_bound`), x taken as the float32 values the op reads. bfloat16
activations on a CPU with AVX512_BF16 (and an ``isa`` of AVX-512) take ``vdpbf16ps``: the
same exact products, twice as many per instruction, summed in another order within the same
bound (plus subnormals flushed to zero, which that instruction does).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

KERNELS = ("portable", "avx2", "avx512", "avx512_vnni")  # index = the ops' ``isa`` argument
CHOICES = ("auto", "reference", *KERNELS)
ENVIRONMENT_VARIABLE = "SERQ_CPU_KERNEL"
SOURCES = Path(__file__).resolve().parent / "csrc"
# the gemm argument of the ops: pick by the number of rows, or force one of the two kernels
GEMM_BY_ROWS, GEMM_DECODE, GEMM_PREFILL = 0, 1, 2


class NativeKernelError(RuntimeError):
    """The native kernels could not be built or loaded here."""


def requested() -> str:
    """The path ``SERQ_CPU_KERNEL`` asks for (``auto`` when unset)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be one of {CHOICES}, got {value!r}")
    return value


def _source_files() -> list[Path]:
    return sorted(p for p in SOURCES.iterdir() if p.suffix in (".cpp", ".h", ".inc"))


# -ffp-contract=off: no fused multiply-adds but the ones written, so that the pre-op and the
# quantizers round exactly as the reference does; -fopenmp: at::parallel_for is inline OpenMP
# code, serial without it (torch's own OpenMP pool: torch.set_num_threads governs it)
COMPILE_FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp")
LINK_FLAGS = ("-fopenmp",)


def extra_flags() -> list[str]:
    """``$SERQ_KERNEL_CFLAGS``: compiler flags added to the build, for debugging (the
    AddressSanitizer run of the kernel tests uses ``-fsanitize=address``)."""
    return os.environ.get("SERQ_KERNEL_CFLAGS", "").split()


def cache_folder() -> Path:
    """Where the library is built: one folder per (sources, flags, torch, Python)."""
    digest = hashlib.sha256(" ".join([*COMPILE_FLAGS, *LINK_FLAGS, *extra_flags()]).encode())
    for path in _source_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    key = f"{digest.hexdigest()[:16]}-torch{torch.__version__}-py{platform.python_version()}".replace("+", "_")
    root = os.environ.get("SERQ_KERNEL_CACHE") or Path.home() / ".cache" / "serq_ao" / "cpu_kernels"
    return Path(root) / key


@functools.lru_cache(maxsize=None)
def _library() -> str:
    """Build (once per machine and version) and load the library; its ``torch.ops.serq_cpu``
    ops are then registered. Raises :class:`NativeKernelError` with the reason."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeKernelError(f"the kernels are written for x86-64 and this CPU is {platform.machine()}")
    if load_if_built():
        return str(cache_folder())
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeKernelError(f"no C++ compiler ({compiler!r}, from $CXX or the default) is on PATH")
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        try:  # the pip package (a dependency) has the binary, outside PATH when the venv is not activated
            import ninja
        except ImportError:
            raise NativeKernelError("ninja, which torch's extension builder needs, is not installed") from None
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        return _build()
    finally:
        os.environ["PATH"] = path


def _build() -> str:
    from torch.utils import cpp_extension

    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    wait_for_build_lock(folder)
    if load_if_built():  # another process built it while this one waited
        return str(folder)
    sources = [str(p) for p in _source_files() if p.suffix == ".cpp"]
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        cpp_extension.load(name="serq_cpu_kernels", sources=sources, build_directory=str(folder),
                           extra_cflags=[*COMPILE_FLAGS, *extra_flags()],
                           extra_ldflags=[*LINK_FLAGS, *(f for f in extra_flags() if f.startswith("-fsanitize"))],
                           is_python_module=False, verbose=False)
    except Exception as e:  # a compiler error, a missing header: the reference still works
        raise NativeKernelError(f"building the kernels in {folder} failed: {str(e).strip().splitlines()[-1]}") from e
    finally:
        quiet.setLevel(level)
    _register_fakes()
    _loaded.append(str(folder / LIBRARY_FILE))
    return str(folder)


# A build takes under a minute here; torch's builder holds `lock` in the folder while it runs and
# waits, without end, for a lock it did not take. A build killed outright (SIGKILL, power loss)
# leaves its lock behind, which would hang every later process: one older than this is removed.
STALE_BUILD_LOCK_SECONDS = 600


def wait_for_build_lock(folder: Path, stale_after: float = STALE_BUILD_LOCK_SECONDS, poll: float = 1.0) -> None:
    """Return once ``folder`` has no build lock: wait while another process builds, remove a lock
    older than ``stale_after`` seconds (with a warning naming it)."""
    lock = folder / "lock"
    told = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > stale_after:
            log.warning("serq: removing %s, left %.0f s ago by a CPU kernel build that did not finish", lock, age)
            lock.unlink(missing_ok=True)
            return
        if not told:
            log.warning("serq: waiting for another process to finish building the CPU kernels in %s (a lock "
                        "older than %.0f s is taken as left by a killed build)", folder, stale_after)
            told = True
        time.sleep(poll)


LIBRARY_FILE = "serq_cpu_kernels.so"
_loaded: list[str] = []  # the library file once loaded in this process


def load_if_built() -> bool:
    """Load the library if this machine has built it for these sources already (never
    compiles): code compiled ahead of time (AOTInductor) calls the ``serq_cpu`` ops, which must
    exist in a fresh process before any packed linear runs. False if there is none yet."""
    if _loaded:
        return True
    folder = cache_folder()
    library = folder / LIBRARY_FILE
    if not library.is_file() or (folder / "lock").exists():  # none, or another process is building it
        return False
    try:
        torch.ops.load_library(str(library))
    except OSError as e:
        log.warning("serq: cannot load the built CPU kernels %s (%s); building them again", library, e)
        return False
    _register_fakes()
    _loaded.append(str(library))
    return True


def _register_fakes() -> None:
    """Shapes for tracing (torch.compile and export trace the serq ops' bodies)."""
    lib = torch.library

    def lead(x):
        return tuple(x.shape[:-1])

    @lib.register_fake("serq_cpu::linear_mxfp4")
    def _(x, qdata, scale, in_features, rank, rceil, scale_inv, perm, bias, rotation, isa, gemm):
        return x.new_empty((*lead(x), qdata.shape[0]))

    @lib.register_fake("serq_cpu::linear_int")
    def _(x, qdata, scale, in_features, group_size, activation_bits, correction_qdata, correction_scale, scale_inv,
          perm, bias, rotation, isa, gemm):
        return x.new_empty((*lead(x), qdata.shape[0]))

    @lib.register_fake("serq_cpu::linear_mxfp4_panels")
    def _(x, panels, scale, out_features, in_features, rank, rceil, scale_inv, perm, bias, rotation, isa):
        return x.new_empty((*lead(x), out_features))

    @lib.register_fake("serq_cpu::linear_int_panels")
    def _(x, panels, scale, in_features, group_size, rank, activation_bits, correction_scale, scale_inv, perm, bias,
          rotation, isa):
        return x.new_empty((*lead(x), scale.shape[0]))

    @lib.register_fake("serq_cpu::linear_int8_weights")
    def _(x, qdata, scale, bias, isa):
        return x.new_empty((*lead(x), qdata.shape[0]))

    @lib.register_fake("serq_cpu::quantize_mxfp4")
    def _(x, scale_inv, perm, rotation, rceil, isa):
        blocks = -(-x.shape[-1] // 32)
        return (x.new_empty((*lead(x), blocks * 16), dtype=torch.uint8),
                x.new_empty((*lead(x), blocks), dtype=torch.uint8))

    @lib.register_fake("serq_cpu::quantize_int")
    def _(x, scale_inv, perm, rotation, bits, group_size, isa):
        groups = -(-x.shape[-1] // group_size)
        return (x.new_empty((*lead(x), groups * group_size), dtype=torch.uint8),
                x.new_empty((*lead(x), groups), dtype=torch.float32),
                x.new_empty((*lead(x), groups), dtype=torch.int32))


def cpu_best() -> str:
    """The best path this CPU runs (builds the library if needed)."""
    _library()
    return KERNELS[torch.ops.serq_cpu.cpu_isa()]


@functools.lru_cache(maxsize=None)
def _chosen(request: str) -> int | None:
    """The ``isa`` argument for ``request``, or None for the reference (warned once)."""
    if request == "reference":
        return None
    try:
        best = cpu_best()
    except NativeKernelError as e:
        if request != "auto":
            raise ValueError(f"{ENVIRONMENT_VARIABLE}={request}: the native kernels are unavailable: {e}") from e
        warnings.warn(f"serq: native CPU kernels unavailable ({e}); the packed linears run the plain-PyTorch "
                      "reference, which is correct but slow", RuntimeWarning, stacklevel=4)
        return None
    if request == "auto":
        log.info("serq CPU kernels: %s (built in %s)", best, _library())
        return KERNELS.index(best)
    if KERNELS.index(request) > KERNELS.index(best):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={request}: this CPU supports at most {best!r}; "
                         f"choose one of {CHOICES[:2] + KERNELS[:KERNELS.index(best) + 1]}")
    return KERNELS.index(request)


def selected_isa() -> int | None:
    """The ``isa`` argument the ops run with here, or None: the reference."""
    return _chosen(requested())


@functools.lru_cache(maxsize=None)
def _warn_int_group(group_size: int) -> None:
    warnings.warn(f"serq: the native CPU kernels take INT group sizes that are multiples of 32; group_size "
                  f"{group_size} runs the plain-PyTorch reference (slow)", RuntimeWarning, stacklevel=4)


def int_isa(group_size: int) -> int | None:
    """:func:`selected_isa` for an INT linear of ``group_size`` (the kernels' blocks are 32 wide)."""
    isa = selected_isa()
    if isa is not None and group_size % 32:
        _warn_int_group(group_size)
        return None
    return isa


def kernel_info() -> dict:
    """What runs the packed linears on this CPU, for benchmarks' records."""
    isa = selected_isa()
    info = {"requested": requested(), "native": isa is not None, "path": "reference" if isa is None else KERNELS[isa]}
    if isa is not None:
        info["cpu_best"] = cpu_best()
        info["build_folder"] = _library()
    return info


def linear_mxfp4(x: Tensor, qdata: Tensor, scale: Tensor, in_features: int, rank: int, scale_mode: str,
                 input_scale_inv: Tensor | None, input_perm: Tensor | None, bias: Tensor | None, rotation: int,
                 isa: int, gemm: int = GEMM_BY_ROWS) -> Tensor:
    """``serq::linear_mxfp4`` on the native kernels: (..., N) in x's dtype. One call into C++,
    which converts what needs converting (a decode-sized linear costs microseconds)."""
    _library()  # loaded once: the ops exist from then on
    return torch.ops.serq_cpu.linear_mxfp4(x, qdata, scale, in_features, rank, scale_mode == "rceil", input_scale_inv,
                                           input_perm, bias, rotation, isa, gemm)


def linear_int(x: Tensor, qdata: Tensor, scale: Tensor, in_features: int, group_size: int, activation_bits: int,
               correction_qdata: Tensor | None, correction_scale: Tensor | None, input_scale_inv: Tensor | None,
               input_perm: Tensor | None, bias: Tensor | None, rotation: int, isa: int,
               gemm: int = GEMM_BY_ROWS) -> Tensor:
    """``serq::linear_int`` on the native kernels: (..., N) in x's dtype."""
    _library()
    return torch.ops.serq_cpu.linear_int(x, qdata, scale, in_features, group_size, activation_bits, correction_qdata,
                                         correction_scale, input_scale_inv, input_perm, bias, rotation, isa, gemm)


def panel_columns(isa: int) -> int:
    """Output columns of one panel of the prepacked layout on path ``isa`` (1: no prepacking)."""
    _library()
    return torch.ops.serq_cpu.panel_columns(isa)


def prepack_weight(main: Tensor, correction: Tensor | None, group_size: int, isa: int) -> Tensor:
    """The codes of ``[main | correction]`` ((N, Kp/2) and (N, r/2) uint8; for MXFP4 the two
    halves of qdata) prepacked for path ``isa``: (panels, quads, 2 * panel_columns) uint8.
    ``group_size``: the columns that share a weight scale (32 for MXFP4)."""
    _library()
    return torch.ops.serq_cpu.prepack_weight(main, correction, group_size, isa)


def prepack_e8m0(scale: Tensor, isa: int) -> Tensor:
    """An MXFP4 weight's E8M0 scales (N, K'/32) in the panel order of path ``isa``:
    (panels, K'/32, panel_columns) uint8 (the padding columns' scales are 1: their codes are 0)."""
    width = panel_columns(isa)
    if width == 1:
        raise ValueError(f"prepack_e8m0: the {KERNELS[isa]!r} path has no prepacked GEMM")
    n, blocks = scale.shape
    panels = -(-n // width)
    padded = torch.full((panels * width, blocks), 127, dtype=torch.uint8)
    padded[:n] = scale
    return padded.view(panels, width, blocks).transpose(1, 2).contiguous()


def linear_mxfp4_panels(x: Tensor, panels: Tensor, panel_scale: Tensor, out_features: int, in_features: int, rank: int,
                        scale_mode: str, input_scale_inv: Tensor | None, input_perm: Tensor | None, bias: Tensor | None,
                        rotation: int, isa: int) -> Tensor:
    """:func:`linear_mxfp4` on a prepacked weight: codes from :func:`prepack_weight`, scales
    from :func:`prepack_e8m0`."""
    _library()
    return torch.ops.serq_cpu.linear_mxfp4_panels(x, panels, panel_scale, out_features, in_features, rank,
                                                  scale_mode == "rceil", input_scale_inv, input_perm, bias, rotation, isa)


def linear_int_panels(x: Tensor, panels: Tensor, scale: Tensor, in_features: int, group_size: int, rank: int,
                      activation_bits: int, correction_scale: Tensor | None, input_scale_inv: Tensor | None,
                      input_perm: Tensor | None, bias: Tensor | None, rotation: int, isa: int) -> Tensor:
    """:func:`linear_int` on a prepacked weight (``rank``: the correction's columns, in the panels)."""
    _library()
    return torch.ops.serq_cpu.linear_int_panels(x, panels, scale, in_features, group_size, rank, activation_bits,
                                                correction_scale, input_scale_inv, input_perm, bias, rotation, isa)


def quantize_activation_mxfp4(x: Tensor, scale_mode: str, input_scale_inv: Tensor | None, input_perm: Tensor | None,
                              rotation: int, isa: int) -> tuple[Tensor, Tensor]:
    """Pre-op, then MXFP4 codes (..., Kp/2) and E8M0 scales (..., Kp/32), as serq_ao.formats makes them."""
    _library()
    return torch.ops.serq_cpu.quantize_mxfp4(x, input_scale_inv, input_perm, rotation, scale_mode == "rceil", isa)


def quantize_activation_int(x: Tensor, bits: int, group_size: int, input_scale_inv: Tensor | None,
                            input_perm: Tensor | None, rotation: int, isa: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pre-op, then asymmetric codes (..., Kp) uint8, scales and zero points (..., Kp/g)."""
    _library()
    return torch.ops.serq_cpu.quantize_int(x, input_scale_inv, input_perm, rotation, bits, group_size, isa)


def linear_int8_weights(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None, isa: int) -> Tensor:
    """``(x qdata^T) * scale + bias`` on the native kernels: x (..., K) float32, bfloat16, float16
    or float64; qdata (N, K) int8 with contiguous rows (any row stride); scale (N,) one float per
    row; bias (N,) or None. Returns (..., N) in x's dtype. Within
    :func:`int8_weights_error_bound` of the exact result of x's float32 values (see the module doc)."""
    _library()
    return torch.ops.serq_cpu.linear_int8_weights(x, qdata, scale, bias, isa)


def int8_weights_error_bound(abs_products_sum: Tensor, k: int, scale: Tensor | float = 0.0) -> Tensor:
    """The largest ``|native - exact|`` of :func:`linear_int8_weights`, from
    ``scale_n sum_k |x_k| |q_k| + |bias_n|`` (float64) over K columns: ``gamma(K + 2)`` times it
    (K roundings of the float32 sum, one of the scale, one of the bias), plus, for the
    bfloat16 dot products of AVX512_BF16 CPUs, which treat subnormals as zero, at most
    ``127 * 2^-126`` per product and partial sum, times the row's ``scale`` (tiny, but not zero)."""
    u = 2.0**-24
    n = k + 2
    return (n * u / (1 - n * u)) * abs_products_sum + (2 * k + 1) * 127 * 2.0**-126 * scale


def error_bound(abs_products_sum: Tensor, columns: int) -> Tensor:
    """The largest ``|native - reference|`` the module doc allows, from ``sum_k |a_k| |w_k|``
    (+ |bias|) over the ``columns`` = K' products of an output."""
    u = 2.0**-24
    n = columns + 2
    return 2 * (n * u / (1 - n * u)) * abs_products_sum


if __name__ == "__main__":  # `python -m serq_ao.kernels.cpu_native`: build now, say what runs
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(kernel_info())
