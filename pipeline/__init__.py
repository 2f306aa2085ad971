"""cfkd: find and remove Clever-Hans shortcuts in image classifiers.

Stages (one module each): ``square`` / ``shapes`` / ``data`` (datasets), ``train`` (classifiers), ``evaluate``,
``dfr``, ``explain``, ``feedback``, ``distil``, ``report``; ``manifest`` is the artefact between explain and the
rest, ``rounds`` the CFKD round policy; ``runner`` chains the stages in a run directory (``rundir``) and ``cli``
exposes them.
"""

__version__ = "0.1.0"

import os as _os
import signal as _signal
import sys as _sys

# A DDP worker Lightning spawned (multiprocessing's spawn) from a cfkd process: Ctrl-C reaches the whole process
# group, and the parent stops its workers itself; quiet when the parent is
if "--multiprocessing-fork" in _sys.orig_argv:
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    if _os.environ.get("CFKD_QUIET") == "1":
        import lightning  # noqa: F401  (first: importing Lightning sets its loggers to INFO)

        from pipeline import quiet as _quiet

        _quiet.configure(False)
