"""The names a run is tagged with, once: jobs write them, sweeps, reports and the alignment map read them.

Plain strings (no MLflow here), so a module that only reads runs' tags needs nothing else.
"""

from __future__ import annotations

# -- what a run is ---------------------------------------------------------------------------------
ROLE = "diito.role"
TEACHER_ROLE, STUDENT_ROLE, SWEEP_ROLE = "teacher", "student", "sweep"  # the values of ROLE

# -- what a job ran (bare names: the runs table's columns users filter on) ---------------------------
TASK = "task"
TEACHER = "teacher"  # the teacher's name (teacher.name)
STUDENT_LAYERS = "student_layers"
LOSS = "loss"  # the objective: kd | diito
CONFIG_HASH = "config_hash"  # the job's identity (diito.identity)

# -- where the teacher came from ---------------------------------------------------------------------
TEACHER_RUN = "diito.teacher_run_id"
TEACHER_SOURCE = "diito.teacher_source"  # checkpoint | cache | fine-tuned
TEACHER_PATH = "diito.teacher_path"
TEACHER_OUTPUTS = "diito.teacher_outputs"  # live | cache | built: where a student run's teacher base runs came from
TEACHER_OUTPUTS_PATH = "diito.teacher_outputs_path"

# -- how it went -----------------------------------------------------------------------------------
PLATEAU = "diito.plateau"  # the model predicts one class
ERROR = "error"  # a FAILED or stopped run's error

# -- sweeps ----------------------------------------------------------------------------------------
SWEEP_ID = "diito.sweep_id"
SWEEP_DIR = "sweep_dir"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: nests a job under its sweep in the UI
BEST_RUN, BEST_RUN_ID = "best_run", "best_run_id"
REUSED = "diito.reused."  # a sweep parent's tag per finished run it reused: diito.reused.<run id> = the run's name
