"""cfkd: find and remove Clever-Hans shortcuts in image classifiers.

Stages (one module each): ``square`` / ``shapes`` / ``data`` (datasets), ``train`` (classifiers), ``evaluate``,
``dfr``, ``explain``, ``feedback``, ``distil``, ``report``; ``manifest`` is the artefact between explain and the
rest, ``rounds`` the CFKD round policy; ``runner`` chains the stages in a run directory (``rundir``) and ``cli``
exposes them.
"""

__version__ = "0.1.0"
