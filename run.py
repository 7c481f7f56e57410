"""Entry point: ``python run.py [overrides]``, or ``python run.py -m ...`` for a sweep."""

import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diito import interrupts, renamed, store

# The project folder holds the MLflow database and the caches, whatever the working directory
# (conf/paths/default.yaml reads it).
os.environ.setdefault("DIITO_HOME", str(Path(__file__).resolve().parent))

# An identical job is running: nothing was started; the same command succeeds once it has ended
# (sysexits.h's EX_TEMPFAIL, "try again later"), told apart from bad input (2) and a failed job (1).
EXIT_RUNNING = 75


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    import logging

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from diito import config, tracking
    from diito.files import NoSpace
    from diito.job import JobRunning, run
    from diito.sources import DataError
    from diito.store import StoreError
    from diito.sweep import record_job_failure, sweep_info
    from diito.trainer import NonFiniteLoss

    store.mask_logs()  # again: a launcher's worker process did not run this file's top level
    interrupts.handle_sigterm()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    job_name = hydra_cfg.job.override_dirname or "default"
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    sweep = sweep_info(hydra_cfg.sweep.dir) if in_sweep else None
    try:
        return run(cfg, output_dir, hydra_dir=output_dir / hydra_cfg.output_subdir, job_name=job_name, sweep=sweep)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the run is marked KILLED; say how to continue
        print(interrupts.how_to_continue(stop), file=sys.stderr)
        raise
    except Exception as e:
        if in_sweep:  # one failing job must not stop the sweep; it shows there as a FAILED child
            logging.getLogger("diito").error("job %s failed: %s", tracking.mask(job_name), tracking.mask(str(e)))
            record_job_failure(hydra_cfg.sweep.dir, output_dir, job_name, e)
            if sweep and not isinstance(e, tracking.RunFailed):  # it failed before its run existed
                tracking.record_failure(config.tracking_settings(cfg), job_name, tracking.sweep_tags(sweep) | {tracking.ROLE: "student"},
                                        config.raw_params(cfg), e)
            return float("nan")
        if isinstance(e, (config.ConfigError, DataError)):  # bad input: nothing was started
            print(f"error: {store.mask(str(e))}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, JobRunning):  # nothing was started either
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_RUNNING)
        cause = e.__cause__ if isinstance(e, tracking.RunFailed) else e
        if isinstance(cause, (NonFiniteLoss, NoSpace, StoreError)):  # said in one line (and in its FAILED run): a traceback adds nothing
            print(f"error: {store.mask(str(cause))}", file=sys.stderr)
            sys.exit(1)
        if store.mask(str(e)) != str(e):  # the traceback Hydra prints would show a credential: print it masked
            print(store.mask("".join(traceback.format_exception(e))), file=sys.stderr)
            sys.exit(1)
        raise


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
        raise
