"""Build hook for the one compiled part: the optional native CPU kernel of JEST's chunk loop.

Everything else about the distribution lives in ``pyproject.toml``. The extension is ``optional``: where no
C compiler is available the install still succeeds and ``jest_trainer.selection`` runs the same loop in
NumPy (slower per step; the same draws up to float rounding in near-ties).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "jest_trainer._selection_native",
            sources=["trainer_image/jest_trainer/_selection_native.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ]
)
