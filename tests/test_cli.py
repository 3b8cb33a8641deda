"""The one command-line grammar: options built from config fields, the --label forms, the model
group (a pixel model or the pipeline) and the sampling controls that Drawing alone checks."""

import argparse
from dataclasses import dataclass

import pytest

from pipelines.cli import (RUN_SETTINGS_NOTE, add_config_options, add_model_options, chosen_model, config_parser,
                           label_option, options_of, user_path)
from pipelines.infer.generation import ALL, DATA, MIXTURE, label_forms, parse_label, read_label
from pipelines.train.pixels import TrainConfig
from pipelines.train.priors import PriorTrainConfig
from pipelines.train.run_config import run_field, setting
from pipelines.train.vqvae import VQVAETrainConfig
from prior.drawing import Drawing


@dataclass
class WarmupConfig(TrainConfig):
    warmup: int | None = run_field("steps of linear learning-rate warm-up")
    cache: str = setting("cache", "where to cache the crops", path=True)
    note: str = setting("", command_line=False)


def option(parser, flag):
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action


def test_a_field_added_to_a_config_is_an_option_with_its_help():
    parser = config_parser(WarmupConfig, "a trainer")
    warmup, cache = option(parser, "--warmup"), option(parser, "--cache")
    assert warmup.help == "steps of linear learning-rate warm-up [run setting]" and warmup.type is int
    assert warmup.default is argparse.SUPPRESS and parser.epilog == RUN_SETTINGS_NOTE
    assert cache.help == "where to cache the crops" and cache.type is user_path and cache.default == "cache"
    assert not [a for a in parser._actions if "--note" in a.option_strings]  # kept off the command line
    assert "steps of linear learning-rate warm-up [run setting]" in " ".join(parser.format_help().split())

    args = parser.parse_args([])
    assert "warmup" not in vars(args) and "seed" not in vars(args)  # run settings: the preset's or the run's
    assert args.cache == "cache" and args.steps == 1000 and args.compile is False
    config = WarmupConfig(**vars(parser.parse_args(["--warmup", "5", "--cache", "~/crops", "--compile"])))
    assert config.warmup == 5 and not config.cache.startswith("~") and config.compile is True


def test_a_field_without_help_is_refused_when_the_parser_is_built():
    @dataclass
    class Undocumented(TrainConfig):
        warmup: int | None = run_field()

    with pytest.raises(TypeError, match="Undocumented.warmup has no help"):
        config_parser(Undocumented, "a trainer")


def test_a_redeclared_default_keeps_the_fields_help_and_role():
    vqvae, prior = config_parser(VQVAETrainConfig, ""), config_parser(PriorTrainConfig, "")
    steps = option(vqvae, "--steps")
    assert steps.default == 2000 and steps.help == "total optimizer steps of the run"
    assert option(vqvae, "--preset").choices == ["vqvae2", "vqvae2-ffhq1024", "cpu-small"]
    assert option(prior, "--out").required and option(prior, "--codes").required
    assert option(prior, "--codes").default is None  # required: never left out of the namespace
    assert not [a for a in prior._actions if "--n-samples" in a.option_strings]
    assert not [a for a in prior._actions if "--lr-decay" in a.option_strings]


# ------------------------------------------------------------------------------------------------
# --label


@pytest.mark.parametrize("spec, forms, n_classes, expected", [
    ("3", ("class",), None, 3),
    ("3", ("class", "list", ALL), 5, 3),
    ("3,0,4", ("class", "list", ALL), 5, (3, 0, 4)),
    ("3,0,4", ("class", "list", ALL), None, (3, 0, 4)),
    ("all", ("class", "list", ALL), 3, (0, 1, 2)),
    ("all", ("class", "list", ALL), None, ALL),
    ("data", ("class", DATA, MIXTURE), 3, DATA),
    ("mixture", ("class", DATA, MIXTURE), 3, MIXTURE),
    (None, ("class",), 3, None),
])
def test_every_label_form(spec, forms, n_classes, expected):
    assert parse_label(spec, forms, n_classes) == expected


@pytest.mark.parametrize("spec, forms, n_classes, message", [
    ("1,x", ("class", "list", ALL), None, "--label must be a class, a comma list of classes or all, got '1,x'"),
    ("3,7", ("class",), None, "--label must be a class, got '3,7'"),
    ("all", ("class",), 4, "--label must be a class in [0, 4), got 'all'"),
    ("mixture", ("class", "list", ALL), None, "--label must be a class, a comma list of classes or all, got 'mixture'"),
    ("data", ("class", "list", ALL), None, "got 'data'"),
    ("cat", ("class", DATA, MIXTURE), 3, "--label must be a class in [0, 3), data or mixture, got 'cat'"),
    ("", ("class",), None, "--label must be a class, got ''"),
    ("3", ("class",), 3, "label must lie in [0, 3), got 3"),
    ("0,-1", ("class", "list"), 3, "label must lie in [0, 3), got -1"),
])
def test_label_forms_a_script_does_not_take_are_refused(spec, forms, n_classes, message):
    with pytest.raises(ValueError) as refusal:
        parse_label(spec, forms, n_classes)
    assert message in str(refusal.value)


def test_a_label_is_needed_by_class_conditional_models_only():
    assert read_label(None, ("class",), 0) is None
    assert read_label("1,2", ("class", "list"), 3) == (1, 2)
    with pytest.raises(ValueError, match=r"the priors are class-conditional: give a label in \[0, 3\) "
                                         r"\(--label: a class or all\)"):
        read_label(None, ("class", ALL), 3)
    with pytest.raises(ValueError, match=r"the model is not class-conditional: give no label \(got 2\)"):
        read_label("2", ("class",), 0, "the model is")


def test_the_label_help_names_the_forms_a_script_takes():
    parser = argparse.ArgumentParser()
    label_option(parser, ("class", "list", ALL), "class of the samples", "; needed by class-conditional priors")
    assert option(parser, "--label").help == ("class of the samples: a class (3), a comma list of classes (3,7,9) or "
                                              "all (every class); needed by class-conditional priors")
    assert label_forms((DATA, MIXTURE)) == "data or mixture"


# ------------------------------------------------------------------------------------------------
# a pixel model, or the VQ-VAE and its priors


def model_parser(**options):
    parser = argparse.ArgumentParser()
    add_model_options(parser, **options)
    parser.add_argument("--samples")
    return parser


@pytest.mark.parametrize("argv, message", [
    ([], "give either --vqvae, --top and --bottom (the pipeline) or --ckpt (a pixel model)"),
    (["--ckpt", "p", "--vqvae", "v"], "give a pixel model (--ckpt) or the pipeline (--vqvae --top --bottom), not both: "
                                      "give either --ckpt or --vqvae, --top and --bottom"),
    (["--ckpt", "p", "--vqvae", "v", "--top", "t", "--bottom", "b"], "not both"),
    (["--vqvae", "v", "--bottom", "b"], "the pipeline needs all three of --vqvae, --top and --bottom (missing --top): "
                                        "give either all three or --ckpt (a pixel model)"),
])
def test_the_model_group_takes_a_pixel_model_or_the_whole_pipeline(argv, message):
    with pytest.raises(ValueError) as refusal:
        chosen_model(model_parser().parse_args(argv))
    assert message in str(refusal.value)


def test_the_model_group_answers_what_was_chosen():
    parser = model_parser()
    assert chosen_model(parser.parse_args(["--ckpt", "~/p"])) is None
    assert chosen_model(parser.parse_args(["--vqvae", "v", "--top", "t", "--bottom", "b"])) == ("v", "t", "b")
    assert parser.parse_args(["--ckpt", "~/p"]).ckpt != "~/p"  # paths: ~ expanded


def test_the_pipeline_or_another_option_instead_of_a_pixel_model():
    parser, samples = model_parser(pixel_model=False), ("--samples", "sample.py's samples")
    assert not [a for a in parser._actions if "--ckpt" in a.option_strings]
    assert chosen_model(parser.parse_args(["--samples", "s"]), instead=samples) is None
    with pytest.raises(ValueError, match=r"give either --vqvae, --top and --bottom \(the pipeline\) or --samples"):
        chosen_model(parser.parse_args([]), instead=samples)
    with pytest.raises(ValueError, match="give sample.py's samples"):
        chosen_model(parser.parse_args(["--samples", "s", "--top", "t"]), instead=samples)


def test_a_script_that_takes_the_pipeline_alone_requires_its_three_options(capsys):
    parser = model_parser(pixel_model=False, required=True)
    assert chosen_model(parser.parse_args(["--vqvae", "v", "--top", "t", "--bottom", "b"]), instead=None) == ("v", "t", "b")
    with pytest.raises(SystemExit):
        parser.parse_args(["--vqvae", "v", "--top", "t"])
    assert "the following arguments are required: --bottom" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# temperature, top-k, top-p, guidance: declared by Drawing's fields, checked by Drawing alone


def test_the_sampling_controls_are_drawings_fields():
    parser = argparse.ArgumentParser()
    add_config_options(parser, Drawing)
    assert option(parser, "--top-k").type is int and option(parser, "--guidance").type is float
    assert options_of(Drawing, parser.parse_args(["--top-p", "0.9", "--temperature", "0.5"])) == Drawing(0.5, top_p=0.9)
    for argv, message in ((["--temperature", "nan"], "--temperature must be > 0 and finite, got nan"),
                          (["--top-k", "0"], "--top-k must be >= 1, got 0"),
                          (["--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
                          (["--guidance", "inf"], "--guidance must be finite, got inf")):
        with pytest.raises(ValueError) as refusal:
            options_of(Drawing, parser.parse_args(argv))
        assert str(refusal.value) == message

    only = argparse.ArgumentParser()
    add_config_options(only, Drawing, names=("temperature",))
    assert options_of(Drawing, only.parse_args(["--temperature", "2"])) == Drawing(2.0)
