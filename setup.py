"""Build hook for the optional C parts; everything else is in pyproject.toml.

superd._spawn starts programs without ever changing the daemon's own
credentials, and superd-exec (superd/_exec.c) is the small program through
which a program starts as another user (see both files).  Both are
optional: on a machine without a compiler or Python headers their build
fails with a warning, superd installs anyway and starts programs through
subprocess and a Python trampoline, which is as safe and slower.
``superd check`` and the start-up log say which path is in use.

The man pages are ``data_files`` (``[tool.setuptools.data-files]`` in
pyproject.toml), installed under ``share/man`` of the prefix, where man
finds them for the ``bin`` directory on PATH.
"""

import os
import platform

from setuptools import Distribution, Extension, setup
from setuptools.command.build_ext import build_ext


class DataFilesInEditable(Distribution):
    """A Distribution whose data files an editable install installs too.

    setuptools' editable_wheel installs each "non-editable" category whose
    ``distribution.has_<category>()`` is true, and asks for ``has_data``,
    which Distribution does not have (it has ``has_data_files``): so
    ``pip install -e .`` silently skipped the man pages.  Answering the
    name it asks for makes the editable install copy them, exactly as
    ``pip install .`` does.
    """

    def has_data(self) -> bool:
        return self.has_data_files()


class BuildWithHelper(build_ext):
    """build_ext, then superd-exec next to the extension (in place too)."""

    def run(self) -> None:
        super().run()
        try:
            self._helper()
        except Exception as e:  # optional, like the extension
            print(f"warning: superd-exec not built ({e}); superd falls back to subprocess")

    def _helper(self) -> None:
        out_dir = os.path.dirname(self.get_ext_fullpath("superd._spawn"))
        # It runs once per connection: on x86-64 and AArch64 without the C
        # library (raw system calls, see _exec.c), static everywhere.
        bare = platform.machine() in ("x86_64", "aarch64")
        cflags = ["-O2", "-Wall"] + (
            ["-fno-stack-protector", "-ffreestanding", "-fno-builtin"] if bare else [])
        objects = self.compiler.compile(["superd/_exec.c"], output_dir=self.build_temp,
                                        extra_postargs=cflags)
        link = ["-static", "-nostdlib", "-no-pie"] if bare else ["-static"]
        try:
            self.compiler.link_executable(objects, "superd-exec", output_dir=out_dir,
                                          extra_postargs=link)
        except Exception:
            if bare:
                raise
            self.compiler.link_executable(objects, "superd-exec", output_dir=out_dir)
        os.chmod(os.path.join(out_dir, "superd-exec"), 0o755)


setup(
    distclass=DataFilesInEditable,
    cmdclass={"build_ext": BuildWithHelper},
    ext_modules=[
        Extension(
            "superd._spawn",
            sources=["superd/_spawn.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ],
)
