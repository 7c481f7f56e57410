"""Config composition and validation: every bad value is refused before compute, naming its key."""

import pytest

from diito.config import ConfigError, tracking_settings, validate
from tests.conftest import GLUE, compose_config, run_cli


def test_default_config_composes_and_validates(home):
    job = validate(compose_config())
    c = job.config
    assert c.task.name == "rotten_tomatoes" and c.teacher.name == "minilm"
    assert c.student.layers == 3 and job.student_blocks == [0, 1, 2] and job.patience_layers == [1, 3]  # 6 teacher blocks
    assert c.tracking.uri == f"sqlite:///{home}/mlflow.db"
    assert c.tracking.experiment == "rotten_tomatoes"
    assert c.paths.root == str(home)


def test_overrides_and_groups(home):
    job = validate(
        compose_config(
            [
                "teacher=tiny",
                "student.layers=2",
                "student.init=skip",
                "loss.T=10",
                "loss.alpha=0.9",
                "trainer=debug",
                "tracking=none",
                "seed=7",
            ]
        )
    )
    c = job.config
    assert (c.loss.T, c.loss.alpha, c.seed, c.trainer.max_steps) == (10.0, 0.9, 7, 4)
    assert job.student_blocks == [0, 3] and not c.tracking.enabled


def test_environment_overrides_the_tracking_uri(home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_settings(compose_config()).uri == "http://127.0.0.1:5999"
    with pytest.raises(ConfigError, match="tracking.uri: no MLflow server answers at http://127.0.0.1:5999"):
        validate(compose_config())  # nothing listens there: refused before any compute
    assert validate(compose_config([f"tracking.uri=sqlite:///{home}/y.db"])).config.tracking.uri == f"sqlite:///{home}/y.db"


def test_original_readme_experiment_preset(home):
    cfg = compose_config(["experiment=diito_xxs_sst2"])
    assert cfg.task.name == "sst2" and cfg.teacher.model == "bert-base-uncased" and cfg.mapping.name == "full_original"
    assert cfg.intervention.separate_passes and not cfg.trainer.shuffle and not cfg.trainer.length_grouped
    assert (cfg.loss.gamma, cfg.loss.kl_reduction, cfg.intervention.pairing, cfg.intervention.interchange_min_token) == (
        1.0,
        "mean",
        "permutation",
        0,
    )
    assert (cfg.student.init, cfg.student.init_from, cfg.intervention.interchange_prop) == ("first_k", "pretrained", 0.3)
    assert compose_config(["experiment=kd_xxs_sst2"]).loss.gamma == 0
    assert (cfg.student.layers, cfg.loss.alpha, cfg.loss.T, cfg.optim.lr) == (6, 0.7, 20.0, 2e-5)
    assert (cfg.trainer.batch_size, cfg.trainer.epochs, cfg.trainer.min_steps, cfg.task.max_length) == (32, 5, 0, 128)
    assert list(cfg.loss.patience_layers) == [1, 3, 5, 7, 9]


def test_sweep_presets(home):
    grid = compose_config(["sweep=alpha_T_prop"], hydra=True).hydra
    assert grid.mode.name == "MULTIRUN"
    assert dict(grid.sweeper.params) == {"loss.alpha": "0.5,0.7,0.9", "loss.T": "2,10,20", "intervention.interchange_prop": "0.1,0.3,0.5"}
    seeds = compose_config(["sweep=seeds"], hydra=True).hydra.sweeper.params
    assert dict(seeds) == {"seed": "1,2,3", "loss": "kd,diito"}
    ablation = compose_config(["sweep=ablation", "loss.alpha=0.9", "loss.T=10"], hydra=True)
    assert dict(ablation.hydra.sweeper.params) == {
        "loss": "kd,diito",
        "trainer.max_train_examples": "500,1000",
        "seed": "1,2,3,4,5,6,7,8,9,10",
    }
    assert (ablation.loss.alpha, ablation.loss.T, ablation.tracking.experiment) == (0.9, 10, "rotten_tomatoes-ablation")
    tune = compose_config(["sweep=tune_seeds"], hydra=True)
    params = dict(tune.hydra.sweeper.params)
    assert params.pop("loss") == "kd,diito" and len(params["seed"].split(",")) >= 3  # every setting over at least 3 seeds
    assert params == {"loss.alpha": "0.5,0.9", "loss.T": "2,10", "seed": "1,2,3"}  # one grid, the same for both methods


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.epochs=abc"], "trainer.epochs: Input should be a valid integer"),
        (["trainer.precision=fp8"], "trainer.precision: Input should be"),
        (["student.init=random"], "student.init: Input should be 'first_k' or 'skip'"),
        (["loss.alpha=1.5"], "loss.alpha: Input should be less than or equal to 1"),
        (["loss.alpha=-0.1"], "loss.alpha: Input should be greater than or equal to 0"),
        (["loss.T=0"], "loss.T: Input should be greater than 0"),
        (["loss.T=-2"], "loss.T: Input should be greater than 0"),
        (["student.layers=7"], "student.layers: 7 is deeper than the 6-layer teacher"),
        (["teacher=tiny", "student.layers=5"], "student.layers: 5 is deeper than the 4-layer teacher"),
        (["student.blocks=[0,9,1]"], "student.blocks"),
        (["loss.beta=1", "loss.patience_layers=[1]"], "loss.patience_layers: 1 teacher layers given; a 3-layer student matches 2"),
        (["task=files"], "task.files.train: no path given (set task.files.train=<file>)"),
        (["task=files", "task.files.train=/nonexistent/train.csv", "task.files.validation=/nonexistent/dev.csv"], "/nonexistent/train.csv"),
        (["task.main_metric=f2"], "main_metric"),
        (["teacher.checkpoint=/nonexistent/teacher"], "teacher.checkpoint: cannot load model"),
        (["optim.lr=0"], "optim.lr: Input should be greater than 0"),
        (["intervention.interchange_prop=1.5"], "intervention.interchange_prop: Input should be less than or equal to 1"),
        (["intervention.interchange_mode=spans"], "intervention.interchange_mode: Input should be 'random' or 'consecutive'"),
        (["intervention.pairing=shuffle"], "intervention.pairing"),
        (["loss.gamma=-1"], "loss.gamma: Input should be greater than or equal to 0"),
        (["teacher=tiny", "mapping=explicit"], "mapping.entries[0].student.attention_heads: [0, 6] outside the model's 2 heads"),
        (
            ["mapping=explicit", "mapping.entries=[{student:{layers:[5]},teacher:{layers:[1]}}]"],
            "mapping.entries[0].student.layers: 5 outside blocks 0..2",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(home, overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_column_names_file_and_column(home, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\na,0\nb,1\n")
    overrides = ["task=files", f"task.files.train={train}", f"task.files.validation={train}", "task.text_fields=[text]"]
    with pytest.raises(ConfigError, match=r"train.csv.*'text'"):
        validate(compose_config(overrides))


def test_unknown_key_is_refused_by_hydra(home):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.epoch"):
        compose_config(["trainer.epoch=3"])


def test_job_identity_ignores_what_cannot_change_a_result(home):
    base = validate(compose_config()).hash
    cosmetic = ["trainer.progress=false", "tracking.run_name=x", "trainer.num_threads=1", "trainer.save_every=7", "trainer.log_every=3"]
    assert base == validate(compose_config(cosmetic)).hash
    assert base != validate(compose_config(["loss.T=3"])).hash
    assert base != validate(compose_config(["trainer.max_train_examples=500"])).hash
    # taken on validated values: 4 and 4.0 are the same temperature
    assert validate(compose_config(["loss.T=4"])).hash == validate(compose_config(["loss.T=4.0"])).hash


def test_cli_error_is_one_line_with_nonzero_exit_and_no_run(home):
    result = run_cli(["loss.alpha=2", "teacher=tiny"], home, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: loss.alpha:")
    assert not (home / "mlflow.db").exists()  # nothing was started, so nothing is left RUNNING


def test_cli_help_and_cfg_job(home):
    help_text = run_cli(["--help"], home, timeout=120).stdout
    assert "causal distillation" in help_text and "== Configuration groups ==" in help_text
    assert (
        "teacher: bert-base-uncased, deberta-v3-base, distilbert-base-uncased, hub, minilm, modernbert-base, roberta-base, tiny, "
        "xlm-roberta-base"
    ) in help_text
    printed = run_cli(["--cfg", "job", "loss.T=7"], home, timeout=120)
    assert printed.returncode == 0 and "T: 7" in printed.stdout


@pytest.mark.skipif(not (GLUE / "RTE").exists(), reason="GLUE reference files not present")
def test_local_glue_folder_validates_and_loads(home):
    from diito.sources import load_task

    job = validate(compose_config(["task=rte", f"task.data_dir={GLUE / 'RTE'}", "teacher=tiny"]))
    assert job.config.task.data_dir == str(GLUE / "RTE")
    data = load_task(job.config.task)
    assert {split: len(examples) for split, examples in data.splits.items()} == {"train": 2490, "validation": 277, "test": 3000}
    assert data.label_names == ["entailment", "not_entailment"] and set(data.splits["train"].labels.tolist()) == {0, 1}
    assert data.splits["test"].labels is None and len(data.splits["train"].texts[0]) == 2  # sentence pairs


def test_the_teacher_recipe_is_written_flat_and_read_as_a_loop_and_an_optimiser(home):
    """teacher.recipe holds a loop and an optimiser as plain fields (no inheritance); users write
    their keys flat, and errors and params name them as written."""
    recipe = validate(compose_config(["teacher=tiny", "teacher.recipe.lr=0.01", "teacher.recipe.max_steps=7"])).config.teacher.recipe
    assert (recipe.optim.lr, recipe.loop.max_steps, recipe.loop.epochs, recipe.seed) == (0.01, 7, 1, 42)
    dumped = recipe.model_dump()
    assert dumped["lr"] == 0.01 and dumped["max_steps"] == 7 and "loop" not in dumped and "optim" not in dumped
    with pytest.raises(ConfigError, match=r"^teacher\.recipe\.lr: Input should be greater than 0 \(got -1\.0\)$"):
        validate(compose_config(["teacher=tiny", "teacher.recipe.lr=-1.0"]))
    with pytest.raises(
        ConfigError, match=r"^teacher\.recipe\.weight_decay_typo: torch\.optim\.AdamW does not accept it \(it takes lr, betas"
    ):
        validate(compose_config(["teacher=tiny", "+teacher.recipe.weight_decay_typo=1"]))


def test_several_devices_for_a_teacher_only_job_are_refused(home):
    with pytest.raises(ConfigError, match=r"^trainer\.devices: 2 ranks train the student, but stage=teacher only fine-tunes the teacher"):
        validate(compose_config(["teacher=tiny", "stage=teacher", "trainer.devices=2"]))
