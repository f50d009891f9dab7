"""Every command speaks the option vocabulary of docs/cli.md (skipprofiler._cli.options.VOCABULARY): the same thing
has the same name, short flag, metavar and help style everywhere; retired spellings are hidden."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.main import get_command

from skipprofiler._cli import main as cli_main
from skipprofiler._cli.options import DTYPE_VALUES, RETIRED, VOCABULARY

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
LOADS_A_MODEL = ("profile", "eval", "export-plan", "validate", "bench decode")
# Commands not yet moved to the vocabulary (none today); test_pending_commands_still_diverge keeps this list honest.
PENDING: set[str] = set()


def commands() -> dict:
    cli_main._register_all()
    root = get_command(cli_main.app)
    out = {}

    def walk(prefix: str, group) -> None:
        for name, cmd in group.commands.items():
            path = f"{prefix} {name}".strip()
            if hasattr(cmd, "commands"):  # a group (typer's own copy of click: no isinstance)
                walk(path, cmd)
            else:
                out[path] = cmd

    walk("", root)
    return out


def violations(cmd) -> list[str]:
    found = []
    for param in cmd.params:
        if getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            if not (param.metavar or "").replace("[", "").replace("]", "").replace(".", "").isupper():
                found.append(f"argument {param.name}: metavar {param.metavar!r} is not upper case")
            continue
        long = next((o for o in param.opts if o.startswith("--")), None)
        shorts = [o for o in param.opts if not o.startswith("--")]
        text = (param.help or "").strip()
        if not text.endswith("."):
            found.append(f"{long}: help does not end with a period: {text[-40:]!r}")
        if long in RETIRED:
            found.append(f"{long} is retired for {RETIRED[long]}")
        if param.is_flag:
            if long in VOCABULARY and VOCABULARY[long][1] is not None:
                found.append(f"{long} must take a value {VOCABULARY[long][1]}")
            continue
        if not (param.metavar or "").replace("/", "").isupper():
            found.append(f"{long}: metavar {param.metavar!r} is not upper case")
        if long in VOCABULARY:
            short, metavar = VOCABULARY[long]
            if metavar is None:
                found.append(f"{long} must be a flag")
            elif param.metavar != metavar:
                found.append(f"{long}: metavar {param.metavar!r}, vocabulary {metavar!r}")
            if shorts != ([short] if short else []):
                found.append(f"{long}: short flags {shorts}, vocabulary {short!r}")
        if long == "--dtype" and DTYPE_VALUES not in text:
            found.append(f"--dtype help must list {DTYPE_VALUES!r}")
    return found


@pytest.mark.parametrize("name", sorted(set(commands()) - PENDING))
def test_command_conforms_to_the_vocabulary(name):
    assert violations(commands()[name]) == []


@pytest.mark.parametrize("name", LOADS_A_MODEL)
def test_commands_that_load_a_model_take_dash_m(name):
    model = [p for p in commands()[name].params if "--model" in getattr(p, "opts", [])]
    assert model and model[0].opts == ["--model", "-m"] and not model[0].hidden


def test_pending_commands_still_diverge():
    """Drop a command from PENDING as soon as it conforms."""
    for name in PENDING:
        assert violations(commands()[name]), f"{name} conforms now: remove it from PENDING"


def test_docs_table_lists_exactly_the_vocabulary():
    documented = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.replace("\\|", "").split("|")[1:]]
        if cells and re.fullmatch(r"--[a-z][a-z-]*", cells[0]):
            documented[cells[0]] = (cells[1] or None, None if cells[2] == "flag" else cells[2])
    assert documented == VOCABULARY


@pytest.mark.parametrize("name, argv, key, value", [
    ("bench decode", ["--batch", "4"], "batch", [4]),
    ("profile", ["--generate", "8"], "generate", 8),
    ("eval", ["--greedy-tokens", "5"], "greedy_tokens", 5),
    ("eval", ["--json", "x.json"], "json_path", Path("x.json")),
])
def test_retired_spellings_still_parse(name, argv, key, value):
    ctx = commands()[name].make_context(name, list(argv))
    assert ctx.params[key] == value


def test_every_settings_field_in_the_option_table_is_set_by_that_option():
    """options.OPTION_OF_SETTING (how the CLI prints library messages) names real fields and real options."""
    from dataclasses import fields

    from skipprofiler._cli.options import OPTION_OF_SETTING
    from skipprofiler.evaluation import EvalConfig
    from skipprofiler.fit.from_profile import FitSettings
    from skipprofiler.profile import ProfileSettings

    settings = {"FitSettings": FitSettings, "ProfileSettings": ProfileSettings, "EvalConfig": EvalConfig}
    command_of = {"FitSettings": "export-plan", "ProfileSettings": "profile", "EvalConfig": "eval"}
    for setting, option in OPTION_OF_SETTING.items():
        owner, name = setting.split(".")
        assert name in {f.name for f in fields(settings[owner])}, setting
        opts = {o for p in commands()[command_of[owner]].params for o in getattr(p, "opts", [])}
        assert option in opts, f"{setting}: {command_of[owner]} has no {option}"


def test_every_parameter_in_the_option_table_is_a_setting_or_parameter_and_an_option():
    """options.OPTION_OF_PARAMETER names settings fields several settings objects share, or parameters of the library
    functions the option feeds; each is an option of some command."""
    import inspect
    from dataclasses import fields

    from skipprofiler.profile import distributed
    from skipprofiler.arch import models
    from skipprofiler._cli.options import OPTION_OF_PARAMETER
    from skipprofiler.evaluation import EvalConfig
    from skipprofiler.fit.from_profile import FitSettings
    from skipprofiler.profile import ProfileSettings

    names = {f.name for cls in (FitSettings, ProfileSettings, EvalConfig) for f in fields(cls)}
    for function in (distributed.init_from_env, distributed.rank_device, models.load_model):
        names |= set(inspect.signature(function).parameters)
    opts = {o for command in commands().values() for p in command.params for o in getattr(p, "opts", [])}
    for name, option in OPTION_OF_PARAMETER.items():
        assert name in names and option in opts, (name, option)


def test_library_messages_print_as_options():
    from skipprofiler._cli.errors import in_option_words
    from skipprofiler.fit.from_profile import FitSettings

    problems = FitSettings(target=1.5, mode="static", batch_decision="shared", max_skip=2).problems()
    assert problems and not any("--" in p for p in problems)  # the library names fields
    assert [in_option_words(p) for p in problems] == [
        "--target-skip must be in (0, 1), got 1.5",
        "--batch-decision shared applies to --mode adaptive only (static plans skip the same layers in every row "
        "already)",
        "--max-skip applies to --mode adaptive only"]
    assert in_option_words("FitSettings.dense_every=1 and FitSettings.refine, not Other.field") == (
        "--dense-every 1 and --refine, not Other.field")
    assert in_option_words("EvalConfig.prompt_len=64 + EvalConfig.gen_len=256; lower EvalConfig.gen_len") == (
        "--prompt-len 64 + --gen-len 256; lower --gen-len")
    assert in_option_words('`device="cuda:1"` names one GPU; pass `device="cuda"`, `device_map` or `text_column`, '
                           "not `skipprof merge` or `other`") == (
        "--device cuda:1 names one GPU; pass --device cuda, --device-map or --text-column, not `skipprof merge` or "
        "`other`")
