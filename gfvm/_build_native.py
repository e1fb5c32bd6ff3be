"""cffi builder for gfvm._native (the C part in csrc/).

Every csrc/*.c is compiled into one extension module. Each C module X has X.c, X.h (its
prototypes, included into the generated wrapper) and X.cdef (what Python may call). Constants our
old kernel headers lack live in csrc/kernel_abi.h with static asserts.
Only gfvm/native.py imports the result. Run directly (`python gfvm/_build_native.py`) to build
in place during development.
"""

from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# kernel_abi.h first: it sets _GNU_SOURCE and the constants every module relies on.
HEADERS = [CSRC / "kernel_abi.h"] + [p for p in sorted(CSRC.glob("*.h")) if p.name != "kernel_abi.h"]

ffibuilder = FFI()
ffibuilder.cdef("\n".join(p.read_text() for p in sorted(CSRC.glob("*.cdef"))))
ffibuilder.set_source(
    "gfvm._native",
    "\n".join(f'#include "{p.name}"' for p in HEADERS),
    # setuptools insists on paths relative to setup.py (builds run from the project root)
    sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"],
    libraries=["pthread", "z"],  # z: zlib crc32 (csrc/checksum.c)
)

if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=".", verbose=False)
