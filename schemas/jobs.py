"""What crosses the training launcher: one typed job per training stage.

A stage builds its job (a `TrainingJob` subclass, declared beside the stage's entry point in
`tasks/<stage>/train.py`) from values it has already validated; in process the entry point gets
that very object, and across a launcher (torchrun, accelerate, deepspeed, Ray) the job travels as
JSON and is validated once in each worker against the entry point's annotated job class
(`tasks/training/launcher.py`). Entry points read attributes, never `job["..."]`.
"""

from __future__ import annotations

from pydantic import Field
from tunepipe.schemas.base import StrictModel
from tunepipe.schemas.environment import EnvironmentProfile


class TrainingJob(StrictModel):
    """What every training job carries: the profile it runs on and where it writes."""

    env: EnvironmentProfile = Field(description="The environment profile the stage runs on.")
    output_dir: str = Field(description="The stage's staging directory: the job saves its result under it.")
    checkpoint_dir: str = Field(description="Where the trainer checkpoints and resumes from.")
