"""``hydra/sweeper=optuna``: search with current Optuna, with the command line of Hydra's Optuna plugin.

Hydra's released Optuna sweeper (hydra-optuna-sweeper 1.3) requires optuna < 3, which current
SQLAlchemy, MLflow and NumPy no longer work with, so this small sweeper takes its place under the
same name and syntax:

    python run.py -m hydra/sweeper=optuna hydra.sweeper.n_trials=20 \\
        'loss.alpha=interval(0.5,0.9)' 'loss.T=choice(2,10,20)' 'optim.lr=tag(log,interval(1e-5,1e-3))'

``interval`` is a float range (``tag(log, ...)`` samples it on a log scale), ``choice`` / ``a,b,c`` /
``range`` are categorical; plain values are fixed. Trials run through the configured launcher in
batches of ``n_jobs`` (so ``hydra/launcher=joblib`` runs them in parallel); the job's return value
(the main validation metric) is maximised by default.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional  # noqa: UP035 - OmegaConf reads these annotations of the structured config

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class OptunaSweeperConf:  # no PEP 604 unions or postponed annotations: OmegaConf reads these at runtime
    _target_: str = "hydra_plugins.diito_optuna_sweeper.OptunaSweeper"
    direction: str = "maximize"
    n_trials: int = 20
    n_jobs: int = 1
    seed: Optional[int] = None  # noqa: UP045
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="diito")


def distribution(value: Any) -> Optional[optuna.distributions.BaseDistribution]:  # noqa: UP045
    """The search space of one parsed override value; None for a fixed value."""
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return optuna.distributions.IntDistribution(value.start, value.end, log=log_scale)
        return optuna.distributions.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, ChoiceSweep):
        return optuna.distributions.CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        return optuna.distributions.CategoricalDistribution(list(range(int(value.start), int(value.stop), int(value.step or 1))))
    return None


class OptunaSweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, n_jobs: int, seed: Optional[int], params: Dict[str, str]):  # noqa: UP006,UP045
        self.direction, self.n_trials, self.n_jobs, self.seed = direction, n_trials, n_jobs, seed
        self.params = dict(params or {})

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)

    def space(self, arguments: list[str]) -> tuple[dict[str, optuna.distributions.BaseDistribution], list[str]]:
        """The search space and the fixed overrides, from ``hydra.sweeper.params`` and the command line."""
        parser = OverridesParser.create()
        overrides = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        space, fixed = {}, []
        for override in parser.parse_overrides(overrides):
            found = distribution(override.value())
            if found is None:
                fixed.append(override.input_line)
            else:
                space[override.get_key_element()] = found
        if not space:
            raise ValueError("hydra/sweeper=optuna: nothing to search (give e.g. 'loss.T=choice(2,10)' or 'loss.alpha=interval(0.5,0.9)')")
        return space, fixed

    def sweep(self, arguments: list[str]) -> Any:
        space, fixed = self.space(arguments)
        sampler = optuna.samplers.TPESampler(seed=self.seed)
        study = optuna.create_study(direction=self.direction, sampler=sampler)
        done = 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [fixed + [f"{k}={v}" for k, v in t.params.items()] for t in trials]
            returns = self.launcher.launch(batch, initial_job_idx=done)
            for trial, ret in zip(trials, returns):
                value = ret.return_value if ret.status.name == "COMPLETED" else None
                if value is None or not math.isfinite(value):
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
            done += len(trials)
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        results = {"name": "optuna", "direction": self.direction, "n_trials": self.n_trials, "completed": len(completed)}
        if completed:
            results |= {"best_params": study.best_params, "best_value": study.best_value}
            log.info("best %s: %s", study.best_value, study.best_params)
        out = Path(self.config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), out / "optimization_results.yaml")
        return results
