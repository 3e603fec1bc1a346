"""Build hook for the optional C extension; everything else is in pyproject.toml.

superd._spawn starts programs without ever changing the daemon's own
credentials (see superd/_spawn.c).  It is optional: on a machine without a
compiler or Python headers the build of the extension fails with a warning,
superd installs anyway and starts programs through subprocess's fork path,
which is as safe and slower.  ``superd check`` and the start-up log say which
path is in use.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "superd._spawn",
            sources=["superd/_spawn.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
