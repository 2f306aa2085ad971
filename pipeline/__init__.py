"""cfkd: find and remove Clever-Hans shortcuts in image classifiers.

Stages (one module each): ``square`` / ``data`` (datasets), ``train`` (classifiers), ``evaluate``,
``report``; ``runner`` chains them in a run directory (``rundir``) and ``cli`` exposes them.
"""

__version__ = "0.1.0"
