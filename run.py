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
    import logging

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from diito.config import ConfigError
    from diito.data import DataError
    from diito.pipeline import record_failure, run
    from diito.sweep import sweep_info

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    job_name = hydra_cfg.job.override_dirname or "default"
    sweep = sweep_info(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        return run(cfg, output_dir, hydra_dir=output_dir / hydra_cfg.output_subdir, job_name=job_name, sweep=sweep)
    except Exception as e:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # one failing job must not stop the sweep
            logging.getLogger("diito").error("job %s failed: %s", job_name, e)
            if sweep and not hasattr(e, "mlflow_run_id"):
                record_failure(cfg, job_name, sweep, e)
            return float("nan")
        if isinstance(e, (ConfigError, DataError)):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
