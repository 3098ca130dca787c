"""What ``jest-trainer``'s exit code tells whoever restarts it: retry, or fail the job with the error now.

Why: a gang restart costs a whole rendezvous and a resume, and ``backoffLimit`` restarts of an error the
same inputs raise again (a bad field, a shape that does not fit) only delay the error the user must fix.
The operator (``jest_operator.status``) and ``jestctl run`` fail the job at once on a code in
:data:`NON_RETRYABLE_EXIT_CODES`, with the worker's message; every other non-zero code is retried.

Codes: 0 success (or a clean stop after SIGTERM); 1 an error a restart may cure (a lost peer, I/O, a
device fault); 2 the config file is missing or invalid; 3 a deterministic error found while running.
"""

from __future__ import annotations

import re
import sys

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_INVALID_CONFIG = 2
EXIT_DETERMINISTIC = 3
NON_RETRYABLE_EXIT_CODES: frozenset[int] = frozenset({EXIT_INVALID_CONFIG, EXIT_DETERMINISTIC})

# torch reports shape errors as plain RuntimeErrors; these are the wordings of its shape checks.
_SHAPE_ERROR = re.compile(
    r"shapes? cannot be multiplied|size mismatch|must match the size|Expected size|expected input with shape|"
    r"dimension out of range|Given groups=|shape '\[.*\]' is invalid",
)


def is_deterministic(error: BaseException) -> bool:
    """Whether ``error`` would be raised again by a restart with the same config, data and code.

    An error that declares a boolean ``deterministic`` attribute is taken at its word. Otherwise
    ``ValueError``/``TypeError``/``IndexError``/``NotImplementedError`` (how this trainer reports bad fields
    and unsupported combinations) and torch's shape errors are; a collective's failure (a peer that died,
    a timeout: ``torch.distributed.DistError``), I/O and out-of-memory errors are not.

    Never imports torch: the operator reads this module's codes and its image carries no torch. An error
    raised by torch.distributed means torch is already loaded, so ``sys.modules`` is where to look for it.
    """
    declared = getattr(error, "deterministic", None)
    if isinstance(declared, bool):  # the error's own class knows best (data quality, a missing extra)
        return declared
    distributed = sys.modules.get("torch.distributed")
    dist_error = getattr(distributed, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return False
    if isinstance(error, (ValueError, TypeError, IndexError, NotImplementedError)):
        return True
    return isinstance(error, RuntimeError) and bool(_SHAPE_ERROR.search(str(error)))


def exit_code_for(error: BaseException) -> int:
    """The exit code of a run that ended with ``error``."""
    return EXIT_DETERMINISTIC if is_deterministic(error) else EXIT_RETRYABLE
