"""Entry point: ``python run.py [overrides]``, or ``python run.py -m ...`` for a sweep.

How a failure ends the command (its line, its exit code, what is recorded) is :mod:`diito.failures`.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diito import interrupts, project_home, renamed, store

# The project folder holds the MLflow database and the caches, whatever the working directory
# (conf/paths/default.yaml reads it).
project_home()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from diito import failures
    from diito.job import run
    from diito.sweep import sweep_info

    store.mask_logs()  # again: a launcher's worker process did not run this file's top level
    interrupts.handle_sigterm()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    job_name = hydra_cfg.job.override_dirname or "default"
    sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    sweep = sweep_info(sweep_dir) if sweep_dir else None
    return failures.guarded(
        lambda: run(cfg, output_dir, hydra_dir=output_dir / hydra_cfg.output_subdir, job_name=job_name, sweep=sweep),
        cfg,
        job_name,
        output_dir,
        sweep_dir,
        sweep,
    )


if __name__ == "__main__":
    if moved := renamed.in_overrides(sys.argv[1:]):  # before Hydra, which would only say the old key is unknown
        print(f"error: {moved}", file=sys.stderr)
        sys.exit(2)
    store.mask_logs()
    interrupts.handle_sigterm()
    try:
        main()
    except BaseException as stop:
        # A sweep stopped before its end must not leave its parent run RUNNING. diito.sweep is loaded
        # once a sweep starts (importing it for every command would slow --help down by seconds).
        if "diito.sweep" in sys.modules:
            from diito.sweep import end_stopped_sweep

            end_stopped_sweep(stop)
        if isinstance(stop, KeyboardInterrupt):  # said where it was caught; no traceback
            sys.exit(interrupts.exit_code())
        if "diito.failures" in sys.modules:
            from diito.failures import Refused, end

            if isinstance(stop, Refused):  # bad input a callback found before any job
                sys.exit(end(stop))
        raise
    if "diito.failures" in sys.modules:
        from diito.failures import exit_status

        sys.exit(exit_status())
