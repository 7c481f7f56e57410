"""Entry point: ``python run.py [overrides]``, or ``python run.py -m ...`` for a sweep."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import diito  # noqa: F401  (registers the config resolvers)

# The project folder holds the MLflow database and the caches, whatever the working directory.
os.environ.setdefault("DIITO_HOME", str(Path(__file__).resolve().parent))


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from diito.config import ConfigError
    from diito.data import DataError
    from diito.pipeline import run

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return run(cfg, output_dir, hydra_dir=output_dir / hydra_cfg.output_subdir, job_name=hydra_cfg.job.override_dirname or "default")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
