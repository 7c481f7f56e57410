"""DIITO: causal distillation of BERT-style text classifiers.

Importing the package registers the ``diito_home`` config resolver (the project folder, where the
MLflow database and caches live), so configs compose the same from ``run.py``, tests and notebooks.
"""

import os

from omegaconf import OmegaConf

OmegaConf.register_new_resolver("diito_home", lambda: os.path.abspath(os.environ.get("DIITO_HOME") or os.getcwd()), replace=True)
