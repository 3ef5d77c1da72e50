"""Only the optional compiled hash kernel lives here; everything else is in pyproject.toml.

`optional=True`: on a machine without a C compiler the install still succeeds and the
pipeline falls back to hashlib (same results, slower expansion).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dlm_pipeline.core._blake2b",
            sources=["dlm_pipeline/core/_blake2b.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
