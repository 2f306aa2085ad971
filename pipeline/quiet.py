"""Quiet by default: Lightning's banners and tips and library warnings reach the user only with --verbose."""

import logging
import os
import warnings

# Lightning resets its package logger to INFO when imported, so quieten the modules that actually emit too.
_NOISY = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.pytorch.trainer.connectors.signal_connector",  # "[rank: 0] Received SIGTERM" beside cfkd's own line
    "diffusers",
    "torch",
)


def configure(verbose: bool = False) -> None:
    level = logging.INFO if verbose else logging.ERROR
    os.environ["CFKD_QUIET"] = (
        "0" if verbose else "1"
    )  # read by processes this one starts (pipeline/__init__)
    for name in _NOISY:
        logging.getLogger(name).setLevel(level)
    # diffusers logs a failed load as an error before raising it; cfkd reports the raised error in its own line
    logging.getLogger("diffusers").setLevel(level if verbose else logging.CRITICAL)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # also for processes we start
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read when diffusers creates its logger
