"""Build: the hot modules (balancer/build.py COMPILED) as Cython extension modules.

Cython's pure-Python mode: each listed `.py` is compiled as it is, typed by the `.pxd`
beside it where there is one. Every extension is optional: without a C compiler (or
without Cython) the build still succeeds and installs the same package as pure Python,
which runs the same code interpreted (`balancer version` says which).
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def compiled_names() -> tuple[str, ...]:
    # balancer/build.py by path: importing the package here would need its dependencies
    spec = importlib.util.spec_from_file_location("_balancer_build", HERE / "balancer/build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.COMPILED


def say(msg: str) -> None:
    print(f"balancer build: {msg}", file=sys.stderr, flush=True)


class OptionalBuildExt(build_ext):
    """build_ext where a failing compile installs the module as pure Python instead."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        self.failed: list[str] = []
        super().run()
        if self.failed:
            say(
                f"could not compile {len(self.failed)} module(s) ({', '.join(self.failed)}): "
                "installed pure Python, running interpreted"
            )

    def build_extension(self, ext) -> None:
        # an editable install (`pip install -e .`, the README's) builds afresh in a temporary
        # directory every time; the module already built in the source tree from the same C
        # file is reused instead of compiling it again (cythonize rewrites the C file when
        # its .py or .pxd changes, which makes it newer than the built module)
        built = HERE / self.get_ext_filename(ext.name)
        out = Path(self.get_ext_fullpath(ext.name))
        if (
            built.is_file()
            and built.resolve() != out.resolve()
            and built.stat().st_mtime >= max(Path(s).stat().st_mtime for s in ext.sources)
        ):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, out)
            return
        try:
            super().build_extension(ext)
        except Exception as e:  # CompileError, LinkError, a missing compiler
            self.failed.append(ext.name)
            if len(self.failed) == 1:  # the others most likely fail the same way
                say(f"{ext.name}: {type(e).__name__}: {e}")


def extensions() -> list:
    if os.environ.get("BALANCER_NO_COMPILE", "") not in ("", "0"):
        say("BALANCER_NO_COMPILE set: pure Python install, running interpreted")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        say("Cython not available: pure Python install, running interpreted")
        return []
    from setuptools import Extension

    exts = [
        # -g0: no debug sections (a third of the compile time; perf still finds the symbols)
        Extension(name, [name.replace(".", "/") + ".py"], optional=True, extra_compile_args=["-g0"])
        for name in compiled_names()
    ]
    return cythonize(
        exts,
        language_level=3,
        quiet=True,
        compiler_directives={
            # types come from the .pxd files and cython.* declarations only: Python
            # annotations (str | None, bytes, float) stay documentation, as interpreted
            "annotation_typing": False,
            "binding": True,
            "embedsignature": False,
        },
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
