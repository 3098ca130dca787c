"""The optional compiled CPU kernels of selection (``_selection_native.c``, built by ``setup.py``): the sigmoid
(pairwise) and softmax (CLIP, exp-domain) chunk loops and the pass before the pair-loss sigmoid.

``KERNEL`` is the extension module, or ``None`` where the install had no C compiler; callers then run the
same arithmetic in NumPy/torch, with the same results up to float rounding. Read it at call time
(``native.KERNEL``), so tests can switch the fallback on.
"""

from __future__ import annotations

from types import ModuleType

KERNEL: ModuleType | None
try:
    from jest_trainer import _selection_native as KERNEL  # noqa: N812 - a module bound to a constant's name
except ImportError:  # pragma: no cover - only on installs without a C compiler
    KERNEL = None
