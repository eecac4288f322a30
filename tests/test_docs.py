"""The documentation cannot drift from the code: every `opd ...` line in README.md and docs/ names a real
command with real options (and a real recipe with valid overrides validates with `opd run --dry-run`), and
the configuration reference covers every field of every recipe model, each with a description."""
import importlib.util
import inspect
import re
import shlex
import subprocess
import sys
from typing import Any

import pytest
import typer.main
from pydantic import BaseModel
from typer.testing import CliRunner

from helpers import REPO
from megatron_opd.cli import app

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.yaml)?$|\.\.\.|^<.*>$")  # RECIPE, RUN_DIR, CKPT, URL, ...


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every `opd ...` in inline code and every `opd ...` line of a fenced block."""
    found = []
    for path in DOC_FILES:
        text = path.read_text()
        where = path.relative_to(REPO).as_posix()
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
        for block in blocks:
            for line in block.splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("opd "):
                    found.append((where, line.split("  #")[0].split(" # ")[0].strip()))
        prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
        found += [(where, m.group(1).strip()) for m in re.finditer(r"`(opd [^`]+)`", prose)]
    return found


def _without_optional(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Tokens outside [...] groups, and the options named inside them."""
    kept, optional, depth = [], [], 0
    for token in tokens:
        opens, closes = token.count("["), token.count("]")
        bare = token.strip("[]")
        if depth or opens > closes or (token.startswith("[") and token.endswith("]")):
            if bare.startswith("-"):
                optional.append(bare.split("=")[0])
        else:
            kept.append(token)
        depth += opens - closes
    return kept, optional


def _resolve(tokens: list[str]) -> tuple[Any, list[str], list[str]]:
    """The click command the tokens name, the path to it, and the remaining tokens."""
    command = typer.main.get_command(app)
    path: list[str] = []
    rest = tokens[1:]
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    return command, path, rest


COMMANDS = doc_commands()


def test_the_docs_name_opd_commands():
    assert len(COMMANDS) > 60  # README + the docs pages
    assert {"run", "launch", "serve", "eval", "bench", "export-hf", "convert", "report", "wait-servers"} <= {
        shlex.split(c)[1] for _, c in COMMANDS}


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_every_opd_line_of_the_docs_is_a_real_command(where, command):
    tokens = shlex.split(command.replace("\\|", "|"))
    tokens, optional = _without_optional(tokens)
    if len(tokens) > 1 and PLACEHOLDER.search(tokens[1]):  # `opd COMMAND --help`: any command
        assert tokens[2:] == ["--help"], f"{where}: `{command}`"
        return
    target, path, rest = _resolve(tokens)
    if hasattr(target, "commands"):  # a group named as a whole (`opd bench`), or with its own options (`opd --version`)
        assert all(t.startswith("-") for t in rest) and (path or rest), f"{where}: `{command}`: no such command"
    known = {opt for param in target.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    named = [t.split("=")[0] for t in rest if t.startswith("-") and t != "-"] + optional
    unknown = [o for o in named if o not in known]
    assert not unknown, f"{where}: `{command}`: opd {' '.join(path)} has no option {unknown} (it has {sorted(known)})"
    help_run = CliRunner().invoke(app, [*path, "--help"])
    assert help_run.exit_code == 0, help_run.output
    if path == ["run"] and rest and (REPO / rest[0]).is_file() and not any(
            PLACEHOLDER.search(t) or t.startswith("[") for t in rest):
        run = CliRunner().invoke(app,
                                 ["run", *rest, "--dry-run"], catch_exceptions=False)
        assert run.exit_code == 0 and "a valid" in run.output, f"{where}: `{command}` --dry-run:\n{run.output[-2000:]}"


def _reference_tool():
    spec = importlib.util.spec_from_file_location("make_config_reference", REPO / "tools" / "make_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_configuration_reference_is_current_and_every_field_is_described():
    check = subprocess.run([sys.executable, str(REPO / "tools" / "make_config_reference.py"), "--check"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_configuration_reference_covers_every_field_of_every_recipe_model():
    """Walked independently of the tool: every pydantic model defined in megatron_opd.config, every field."""
    import megatron_opd.config as config_pkg
    from megatron_opd.config import base, cascade, placement, stages, teachers

    models = {cls for module in (base, cascade, placement, stages, teachers) for _, cls in inspect.getmembers(module, inspect.isclass)
              if issubclass(cls, BaseModel) and cls.__module__.startswith(config_pkg.__name__) and cls.model_fields}
    assert len(models) > 20
    reference = (REPO / "docs" / "configuration.md").read_text()
    keys = set(re.findall(r"^\| `([^`]+)` \|", reference, re.M))
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert any(k == name or k.endswith(f".{name}") for k in keys), f"{model.__name__}.{name} is not in the reference"
    rows = {key for _, _, model in _reference_tool().KINDS for key, *_ in _reference_tool().rows(model)}
    assert rows == keys  # and the reference holds nothing else


def test_the_readme_is_a_front_page_with_the_three_commands_and_every_page_is_in_the_site():
    import yaml

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()  # the first block: set up, run, test
    assert [line.split("  #")[0].strip() for line in block] == [
        'python3 -m venv .venv && . .venv/bin/activate && pip install "torch==2.13.0" -e ".[dev]"',
        "opd run recipes/tiny/cascade.yaml",
        "ruff check . && pytest -q",
    ]
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install "torch==2.13.0" -e ".[dev]"' in ci and "ruff check . && pytest -q" in ci
    site = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            for value in item.values():
                yield from pages(value) if isinstance(value, list) else [value]

    assert sorted(pages(site["nav"])) == sorted(p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").glob("**/*.md"))
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):  # the README's links into the docs resolve
        assert (REPO / link).is_file(), link


def test_every_yaml_recipe_fragment_of_the_docs_validates():
    """A ```yaml block whose keys are recipe sections is validated section by section against the models."""
    import yaml

    from megatron_opd.config import OPDStageConfig

    checked = 0
    for path in DOC_FILES:
        for block in re.findall(r"^```yaml\n(.*?)^```", path.read_text(), re.S | re.M):
            fragment = yaml.safe_load(block)
            if not isinstance(fragment, dict) or "kind" in fragment:
                continue
            for section, value in fragment.items():
                field = OPDStageConfig.model_fields.get(section)
                assert field is not None, f"{path.name}: `{section}:` is not a recipe section"
                model = next(m for m in [field.annotation, *getattr(field.annotation, "__args__", ())]
                             if inspect.isclass(m) and issubclass(m, BaseModel))
                model.model_validate(value)
                checked += 1
    assert checked >= 1
