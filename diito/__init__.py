"""DIITO: causal distillation of BERT-style text classifiers."""

import os
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]  # the checkout: run.py, conf/, and by default the store and the caches


def project_home() -> str:
    """The project folder every job writes under (``paths.root``): ``DIITO_HOME``, set to this
    checkout when unset, for jobs (run.py) and for the commands that read their store alike."""
    return os.environ.setdefault("DIITO_HOME", str(PROJECT))
