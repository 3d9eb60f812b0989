"""Build of the compiled core: our C (csrc/) compiled strictly into a static library, and the Cython
extension dwcp._core linked against it.

The C in csrc/ is built with -Wall -Wextra -Werror; the Cython-generated C is not ours, so it gets the
same warnings without -Werror (Cython emits unused-function warnings we cannot fix).
Environment: DWCP_SANITIZE=1 adds ASan/UBSan, DWCP_DEBUG=1 adds Cython linetrace and the engine's
resource counters (DWCP_DEBUG_COUNTERS)."""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

SANITIZE = os.environ.get("DWCP_SANITIZE") == "1"
DEBUG = os.environ.get("DWCP_DEBUG") == "1"

common = ["-O2", "-g", "-fno-strict-aliasing", "-D_GNU_SOURCE"]
macros = []
if SANITIZE:
    common = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=undefined", "-D_GNU_SOURCE"]
if DEBUG:
    common += ["-DDWCP_DEBUG_COUNTERS=1", "-DCYTHON_TRACE_NOGIL=1"]
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

strict = common + ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wpointer-arith",
                   "-Wstrict-prototypes", "-Wmissing-prototypes", "-Icsrc/include"]
link = ["-fsanitize=address,undefined"] if SANITIZE else []

core_sources = sorted(glob.glob("csrc/*.c"))

ext = Extension(
    "dwcp._core",
    sources=["dwcp/_core.pyx"],
    include_dirs=["csrc/include"],
    # The static core is linked in: relink whenever any C source or header changes.
    depends=core_sources + sorted(glob.glob("csrc/*.h") + glob.glob("csrc/include/dwcp/*.h")),
    define_macros=macros,
    extra_compile_args=common + ["-Wall", "-Wno-unused-function"],
    # After the static core on the command line, so the linker resolves hde.c's zstd calls from it.
    extra_link_args=link + ["-lzstd"],
)


# --- netlab delay line: a standalone executable (not an extension) shipped inside the package as
# dwcp/netlab/dwcp-delayline. Built by the build_ext command below (which `build`, `pip install .` and
# `build_ext --inplace` all run); rebuilt when its source or the flags change (DWCP_SANITIZE).
DELAYLINE_SRC = "csrc/netlab/delayline.c"
DELAYLINE_FLAGS = (common + ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wpointer-arith",
                             "-Wstrict-prototypes", "-Wmissing-prototypes"] + link)


def build_delayline(cmd):
    """Compile the delay line with $CC (else the compiler Python was built with) into the package."""
    import shlex
    import subprocess
    import sysconfig

    base = "." if cmd.inplace else cmd.build_lib
    out = os.path.join(base, "dwcp", "netlab", "dwcp-delayline")
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    argv = cc + DELAYLINE_FLAGS + ["-o", out, DELAYLINE_SRC]
    stamp = os.path.join(cmd.build_temp, "dwcp-delayline.cmd")
    wanted = " ".join(argv)
    current = open(stamp).read() if os.path.exists(stamp) else ""
    if (not cmd.force and current == wanted and os.path.exists(out)
            and os.path.getmtime(out) >= os.path.getmtime(DELAYLINE_SRC)):
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.makedirs(cmd.build_temp, exist_ok=True)
    print(wanted)
    subprocess.check_call(argv)
    with open(stamp, "w") as f:
        f.write(wanted)


class build_ext(_build_ext):
    """`setup.py build_ext --inplace` alone does not run build_clib (only `build` does), so the
    extension would link against a missing or stale libdwcpcore.a: build the C core first."""

    def run(self):
        self.run_command("build_clib")
        super().run()
        build_delayline(self)


directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    directives.update({"linetrace": True, "binding": True})

setup(
    cmdclass={"build_ext": build_ext},
    libraries=[("dwcpcore", {"sources": core_sources, "cflags": strict, "include_dirs": ["csrc/include"]})],
    ext_modules=cythonize([ext], compiler_directives=directives, include_path=["dwcp"]),
)
