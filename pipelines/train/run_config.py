"""The settings of a training run: one base that every trainer's config specialises.

A field made with `run_field` defines the run (its data, model, optimisation and seed). None means
"not given": a new run takes the value from its preset or the trainer's default (`run_defaults`),
a resumed run takes it from the run directory, and a value given on resume that differs from the
run's is refused (`pipelines.train.run_state.resolve`), since it would silently make another run. A data
path (`data_field`) is stored absolute and may change on resume: the data it names must then be the
run's own (`pipelines.train.run_state.check_same_data`), so a moved database resumes. The other fields belong to one session (budgets, evaluation, checkpoints, precision, workers) and come
from the caller every time.
"""

from dataclasses import dataclass, field, fields, replace

RUN_FIELD = "run"  # the field metadata key that marks a run-defining setting
DATA_FIELD = "data"  # ... and among them, the paths of the run's data


def run_field(default=None):
    return field(default=default, metadata={RUN_FIELD: True})


def data_field():
    """A run setting naming the run's data (a path, or a dataset name such as "builtin")."""
    return field(default=None, metadata={RUN_FIELD: True, DATA_FIELD: True})


def run_fields(config_class):
    """The names of the settings that define a run of `config_class`."""
    return tuple(f.name for f in fields(config_class) if f.metadata.get(RUN_FIELD))


def data_fields(config_class):
    """The names of the run settings of `config_class` that name its data."""
    return tuple(f.name for f in fields(config_class) if f.metadata.get(DATA_FIELD))


def with_defaults(config):
    """`config` with its run settings left None filled from `config.run_defaults()`."""
    return replace(config, **{k: v for k, v in config.run_defaults().items() if getattr(config, k) is None})


def check_at_least(config, minimum, *names):
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


@dataclass
class BaseRunConfig:
    """What every training run has, whatever it trains."""

    out: str = "runs/run"
    preset: str | None = run_field()  # model and training settings; None: the trainer's default
    batch_size: int | None = run_field()  # per process; None: the preset's
    lr: float | None = run_field()  # None: the preset's
    grad_clip: float | None = run_field()  # max global gradient norm; None: 1.0
    seed: int | None = run_field()  # None: 0
    grad_accum: int | None = run_field()  # batches whose gradients make one optimizer step; None: 1
    steps: int = 1000  # total optimizer steps of the run
    max_minutes: float | None = None  # also stop (and save) after this much time in this session
    precision: str = "auto"
    compile: bool = False  # torch.compile the model (minutes of compilation first)
    eval_every: int = 500
    eval_batches: int | None = 50  # periodic evaluations use this many test batches; the last uses all
    checkpoint_every: int = 500
    workers: int | None = None  # DataLoader workers per process; None: pipelines.train.runtime.default_workers()
    report_to: str | None = None  # "tensorboard": accelerate's tracker also logs what log.jsonl logs
    resume: bool = False
    overwrite: bool = False  # start a new run over a model.safetensors that has no state to resume

    def __post_init__(self):
        check_at_least(self, 1, "steps", "eval_every", "checkpoint_every", "batch_size", "grad_accum",
                       "eval_batches")
        check_at_least(self, 0, "workers")
        check_positive(self, "max_minutes", "lr", "grad_clip")
        if self.report_to not in (None, "tensorboard"):
            raise ValueError(f"report_to must be tensorboard or None, got {self.report_to!r}")
        if self.resume and self.overwrite:
            raise ValueError("--overwrite starts a new run and --resume continues one: give one of them")

    def run_defaults(self):
        """The values of a new run's settings left None: the trainer's defaults and its preset's."""
        return {"grad_clip": 1.0, "seed": 0, "grad_accum": 1}
