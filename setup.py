"""Build hook for the one compiled part: the optional native CPU kernels of JEST's selection (the sigmoid and
softmax chunk loops and the pass before the pair-loss sigmoid).

Everything else about the distribution lives in ``pyproject.toml``. The extension is ``optional``: where no
C compiler is available the install still succeeds and selection runs the same steps in NumPy and torch
(slower per step; the same draws up to float rounding in near-ties).
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
