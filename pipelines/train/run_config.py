"""The settings of a training run: one base that every trainer's config specialises.

A field made with `run_field` defines the run (its data, model, optimisation and seed). None means
"not given": a new run takes the value from its preset or the trainer's default (`run_defaults`),
a resumed run takes it from the run directory, and a value given on resume that differs from the
run's is refused (`pipelines.train.run_state.resolve`), since it would silently make another run. A data
path (`data_field`) is stored absolute and may change on resume: the data it names must then be the
run's own (`pipelines.train.run_state.check_same_data`: its record counts, the fingerprint of its files,
a code database's VQ-VAE), so moved data resumes and other data under the same path does not. The other fields
(`setting`) belong to one session (budgets, evaluation, checkpoints, precision, workers) and come
from the caller every time.

Every field is also the trainers' command-line option of its name (`pipelines.cli.add_config_options`
builds them): its metadata carries the option's help and what its annotation does not say (choices,
a path, required). A subclass that redeclares a field only to change its default keeps the rest
(`field_metadata`).
"""

from dataclasses import dataclass, field, fields, replace

from pipelines.device import PRECISIONS

RUN_FIELD = "run"  # the field metadata key that marks a run-defining setting
DATA_FIELD = "data"  # ... and among them, the paths of the run's data
# the keys of the command-line option a field declares
HELP, CHOICES, PATH, REQUIRED, COMMAND_LINE = "help", "choices", "path", "required", "command_line"


def option_metadata(help=None, choices=None, path=None, required=None, command_line=None):
    """A field's option: its `help`, its `choices`, whether it is a `path` (`~` expanded), `required`
    on the command line, or kept off it (`command_line=False`). Only what is given, so that a
    redeclaration overrides no more than it names."""
    given = {HELP: help, CHOICES: choices, PATH: path, REQUIRED: required, COMMAND_LINE: command_line}
    return {key: value for key, value in given.items() if value is not None}


def setting(default=None, help=None, **option):
    """A setting of one session, given every time (the config's default when not)."""
    return field(default=default, metadata=option_metadata(help, **option))


def run_field(help=None, default=None, **option):
    return field(default=default, metadata={RUN_FIELD: True, **option_metadata(help, **option)})


def data_field(help, **option):
    """A run setting naming the run's data (a path, or a dataset name such as "builtin")."""
    return field(default=None, metadata={RUN_FIELD: True, DATA_FIELD: True, **option_metadata(help, path=True, **option)})


def image_data_field():
    """The data of a trainer of images."""
    return data_field("'builtin' (crops of scikit-image's sample photos, the default), a CIFAR-10 tarball/folder, "
                      "an ImageNet 32x32 npz file/folder, or an image folder")


def field_metadata(config_class):
    """{name: metadata} of every field of `config_class`, each class's declaration of a field laid
    over its bases': `steps: int = 2000` in a subclass changes the default and keeps the help."""
    names = {f.name for f in fields(config_class)}
    merged = {name: {} for name in names}
    for cls in reversed(config_class.__mro__):
        declared = cls.__dict__.get("__dataclass_fields__", {})
        for name in cls.__dict__.get("__annotations__", {}):
            if name in names:
                merged[name].update(declared[name].metadata)
    return merged


def run_fields(config_class):
    """The names of the settings that define a run of `config_class`."""
    return tuple(name for name, metadata in field_metadata(config_class).items() if metadata.get(RUN_FIELD))


def data_fields(config_class):
    """The names of the run settings of `config_class` that name its data."""
    return tuple(name for name, metadata in field_metadata(config_class).items() if metadata.get(DATA_FIELD))


def with_defaults(config):
    """`config` with its run settings left None filled from `config.run_defaults()`."""
    return replace(config, **{k: v for k, v in config.run_defaults().items() if getattr(config, k) is None})


def option_name(name):
    """A config field's command-line option, as messages name it: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def check_at_least(config, minimum, *names):
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ValueError(f"{option_name(name)} must be >= {minimum}, got {value}")


def check_positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ValueError(f"{option_name(name)} must be > 0, got {value}")


@dataclass
class BaseRunConfig:
    """What every training run has, whatever it trains."""

    out: str = setting("runs/run", "run directory", path=True)
    preset: str | None = run_field("model and training settings")  # None: the trainer's default
    batch_size: int | None = run_field("per process")  # None: the preset's
    grad_accum: int | None = run_field("batches whose gradients make one optimizer step: an optimizer step sees "
                                       "processes x batch size x grad accum examples (default 1)")
    lr: float | None = run_field("initial learning rate")  # None: the preset's
    grad_clip: float | None = run_field("max global gradient norm (default 1.0)")
    seed: int | None = run_field("(default 0)")
    steps: int = setting(1000, "total optimizer steps of the run")
    max_minutes: float | None = setting(None, "stop and save after this long")  # in this session
    precision: str = setting("auto", "auto: bf16 autocast where the hardware has native bf16 (AMX, recent GPUs); "
                             "likelihoods and quantizers always compute in fp32", choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile the model: compiles for a minute or more at the start, then runs "
                            "each step faster where it pays (see bench/results/train.md)")
    eval_every: int = setting(500, "steps between test evaluations")
    eval_batches: int | None = setting(50, "test batches per periodic evaluation (the final one uses the whole split)")
    checkpoint_every: int = setting(500, "steps between checkpoints")
    workers: int | None = setting(None, "DataLoader worker processes per process (default: none on CPU, whose cores "
                                  "the model needs; up to 8 with a GPU)")  # None: pipelines.train.runtime.default_workers()
    report_to: str | None = setting(None, "also log what log.jsonl logs with this accelerate tracker, into "
                                    "RUN_DIR/tensorboard", choices=("tensorboard",))
    resume: bool = setting(False, "continue the run in --out where it stopped, with its own run settings (its data "
                           "may be given a new path if it holds the same data)")
    overwrite: bool = setting(False, "start a new run in --out although it holds a model.safetensors without the "
                              "state to resume it (the model is replaced)")

    def __post_init__(self):
        check_at_least(self, 1, "steps", "eval_every", "checkpoint_every", "batch_size", "grad_accum",
                       "eval_batches")
        check_at_least(self, 0, "workers")
        check_positive(self, "max_minutes", "lr", "grad_clip")
        if self.report_to not in (None, "tensorboard"):
            raise ValueError(f"--report-to must be tensorboard or None, got {self.report_to!r}")
        if self.resume and self.overwrite:
            raise ValueError("--overwrite starts a new run and --resume continues one: give one of them")

    def run_defaults(self):
        """The values of a new run's settings left None: the trainer's defaults and its preset's."""
        return {"grad_clip": 1.0, "seed": 0, "grad_accum": 1}
