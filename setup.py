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
from setuptools.command.build_clib import build_clib as _build_clib
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
    depends=core_sources + sorted(glob.glob("csrc/*.h") + glob.glob("csrc/include/dwcp/*.h")
                                  + glob.glob("dwcp/*.pxi") + glob.glob("dwcp/includes/*.pxd")),
    define_macros=macros,
    extra_compile_args=common + ["-Wall", "-Wno-unused-function"],
    # After the static core on the command line, so the linker resolves hde.c's zstd calls and
    # aead.c's libcrypto calls from it.
    extra_link_args=link + ["-lzstd", "-lcrypto"],
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


# --- eBPF telemetry (issue 5): ebpf/*.bpf.c -> clang -target bpf -> llvm-strip -g -> bpftool gen
# skeleton into build/ebpf/<name>.skel.h, which the loader (csrc/ebpf/*.c, strict flags, its own static
# library) embeds; the separate extension dwcp._ebpf links it with libbpf. vmlinux.h comes from this
# kernel's BTF. Without the toolchain the rest still builds and dwcp._ebpf is simply absent
# (dwcp.telemetry.ebpf_source.ebpf_available() then says what is missing).
BPF_GEN_DIR = os.path.join("build", "ebpf")
BPF_SOURCES = sorted(glob.glob("ebpf/*.bpf.c"))
BPF_HEADERS = sorted(glob.glob("ebpf/*.h"))
BPF_SKELETONS = {"flowstats": "dwcp_fs"}    # source stem -> skeleton (and BPF object) name
LOADER_SOURCES = sorted(glob.glob("csrc/ebpf/*.c"))


def bpf_tool(name):
    import shutil
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def bpf_toolchain_missing():
    """What the BPF build lacks (empty list: everything is there)."""
    missing = [t for t in ("clang", "llvm-strip", "bpftool") if not bpf_tool(t)]
    missing += [f for f in ("/usr/include/bpf/libbpf.h", "/usr/include/gelf.h", "/usr/include/zlib.h",
                            "/sys/kernel/btf/vmlinux") if not os.path.exists(f)]
    return missing


BPF_MISSING = bpf_toolchain_missing() if LOADER_SOURCES else ["csrc/ebpf/"]


def build_bpf():
    """vmlinux.h (once per kernel release) and one skeleton per ebpf/*.bpf.c, rebuilt when a BPF
    source or header is newer than it."""
    import subprocess

    os.makedirs(BPF_GEN_DIR, exist_ok=True)
    vmlinux = os.path.join(BPF_GEN_DIR, "vmlinux.h")
    release = os.uname().release
    stamp = vmlinux + ".release"
    if not os.path.exists(vmlinux) or not os.path.exists(stamp) or open(stamp).read() != release:
        print(f"bpftool btf dump file /sys/kernel/btf/vmlinux format c > {vmlinux}")
        with open(vmlinux + ".tmp", "wb") as f:
            subprocess.check_call([bpf_tool("bpftool"), "btf", "dump", "file", "/sys/kernel/btf/vmlinux",
                                   "format", "c"], stdout=f)
        os.replace(vmlinux + ".tmp", vmlinux)
        with open(stamp, "w") as f:
            f.write(release)
    for src in BPF_SOURCES:
        stem = os.path.basename(src)[: -len(".bpf.c")]
        obj = os.path.join(BPF_GEN_DIR, stem + ".bpf.o")
        skel = os.path.join(BPF_GEN_DIR, stem + ".skel.h")
        inputs = [src, vmlinux, __file__] + BPF_HEADERS
        if os.path.exists(skel) and all(os.path.getmtime(skel) >= os.path.getmtime(i) for i in inputs):
            continue
        argv = [bpf_tool("clang"), "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror",
                "-I" + BPF_GEN_DIR, "-Iebpf", "-c", src, "-o", obj]
        print(" ".join(argv))
        subprocess.check_call(argv)
        subprocess.check_call([bpf_tool("llvm-strip"), "-g", obj])
        with open(skel + ".tmp", "wb") as f:
            subprocess.check_call([bpf_tool("bpftool"), "gen", "skeleton", obj, "name",
                                   BPF_SKELETONS.get(stem, "dwcp_" + stem)], stdout=f)
        os.replace(skel + ".tmp", skel)


libraries = [("dwcpcore", {"sources": core_sources, "cflags": strict, "include_dirs": ["csrc/include"]})]
extensions = [ext]
if BPF_MISSING:
    print(f"setup.py: not building dwcp._ebpf (eBPF telemetry): missing {', '.join(BPF_MISSING)}")
else:
    bpf_generated = [os.path.join(BPF_GEN_DIR, s[len("ebpf/"): -len(".bpf.c")] + ".skel.h") for s in BPF_SOURCES]
    libraries.append(("dwcpebpf", {"sources": LOADER_SOURCES, "cflags": strict,
                                   "include_dirs": ["csrc/include", "ebpf", BPF_GEN_DIR],
                                   "obj_deps": {"": BPF_HEADERS + bpf_generated + ["csrc/include/dwcp/ebpf.h"]}}))
    extensions.append(Extension(
        "dwcp._ebpf",
        sources=["dwcp/_ebpf.pyx"],
        include_dirs=["csrc/include", "ebpf", BPF_GEN_DIR],
        depends=LOADER_SOURCES + BPF_HEADERS + bpf_generated + ["csrc/include/dwcp/ebpf.h",
                                                                "dwcp/includes/ebpf.pxd"],
        extra_compile_args=common + ["-Wall", "-Wno-unused-function"],
        # after the static libraries setuptools puts on the command line (dwcpebpf needs libbpf)
        extra_link_args=link + ["-lbpf", "-lelf", "-lz"],
    ))


class build_clib(_build_clib):
    """The eBPF loader library includes the generated skeleton: make it first. Here rather than in
    build_ext because `build` and pip's (editable) wheel builds run build_clib on its own, before
    build_ext -- a fresh clone's `pip install -e .` failed on the missing skeleton."""

    def run(self):
        if not BPF_MISSING:
            build_bpf()
        super().run()


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
    cmdclass={"build_clib": build_clib, "build_ext": build_ext},
    libraries=libraries,
    ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["dwcp"]),
)
