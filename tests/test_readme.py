"""The READMEs' commands, config keys and file names are the code's.

Every ``python -m jobs.NAME --flag`` the READMEs show (in code blocks, continuation lines joined,
and in inline code) must be an option of that job's own parser, with a value among the option's
choices where it has them; every dotted config key they name (``stage1.augment.strength``,
``stageN.batch_size``, ``data.synthetic``) must be in the schema; every ``make`` target they show
must be in the Makefile, and every source file they name must exist; every link to a section
(here and in results/) must land on a heading. A flag, key, file or heading renamed would otherwise
leave the README telling users to type something that fails, or pointing nowhere.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from trueface.config import load_config
from trueface.config.loading import flatten, to_dict

REPO = Path(__file__).resolve().parent.parent
READMES = [REPO / "README.md", REPO / "docker" / "README.md"]
# Named on purpose though not in the schema: the example of the error a misspelt key gets, and a file.
NOT_KEYS = {"stage2.mixup_alfa", "model.py"}
SECTIONS = ("stage1", "stage2", "stageN", "data", "model", "eval", "scaling", "runtime", "output")
KEY = re.compile(r"(?<![\w./-])((?:" + "|".join(SECTIONS) + r")\.[a-z_][a-z0-9_.]*[a-z0-9_])")
JOB = re.compile(r"\bjobs\.(\w+)(?![.\w])([^`\n]*)")  # jobs.NAME and what follows it, not jobs.NAME.attr


def _command_lines(text: str) -> list[str]:
    """Code blocks' lines (shell continuations joined, comments dropped) and each inline code span."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += [re.sub(r"(^|\s)#.*", "", line) for line in block.replace("\\\n", " ").splitlines()]  # no comments
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", prose.replace("\n", " "))
    return lines + spans


def _job_uses(texts: list[str]) -> dict[str, list[list[str]]]:
    """jobs.NAME -> the token lists that follow it, one list per mention."""
    uses: dict[str, list[list[str]]] = {}
    for text in texts:
        for line in _command_lines(text):
            for name, rest in JOB.findall(line):
                uses.setdefault(name, []).append(rest.split())
    return uses


class _Parsed(Exception):
    pass


def _parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``jobs.NAME``'s main builds, caught where it is first asked to parse."""
    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", caught)
        m.setattr(argparse.ArgumentParser, "parse_known_args", caught)
        with pytest.raises(_Parsed) as parsed:
            importlib.import_module(f"jobs.{name}").main([])
    return parsed.value.args[0]


def _placeholder(value: str) -> bool:
    return value.isupper() or value.startswith(("<", "$", "-")) or "|" in value or "..." in value


def test_every_job_flag_the_readmes_show_is_an_option_of_that_job(monkeypatch):
    uses = _job_uses([p.read_text() for p in READMES])
    assert {"pipeline", "tune", "evaluate", "predict", "export", "benchmark"} <= set(uses)  # the scan finds them
    wrong = []
    for name, mentions in sorted(uses.items()):
        if not (REPO / "jobs" / f"{name}.py").is_file():
            wrong.append(f"jobs.{name}: no such job")
            continue
        options = _parser_of(name, monkeypatch)._option_string_actions
        for tokens in mentions:
            for i, token in enumerate(tokens):
                flag = token.split("=", 1)[0].rstrip(",;:.)")
                if not re.fullmatch(r"--[a-z][a-z0-9-]*", flag):
                    continue
                if flag not in options:
                    wrong.append(f"jobs.{name} {flag}: not an option")
                    continue
                value = token.split("=", 1)[1] if "=" in token else (tokens[i + 1] if i + 1 < len(tokens) else "")
                value = value.strip("`,;:.)")
                choices = options[flag].choices
                if choices and value and not _placeholder(value) and value not in map(str, choices):
                    wrong.append(f"jobs.{name} {flag} {value}: not one of {sorted(map(str, choices))}")
    assert wrong == [], "the READMEs show commands the jobs refuse:\n" + "\n".join(sorted(set(wrong)))


def test_every_config_key_the_readmes_name_is_in_the_schema():
    keys = set(flatten(to_dict(load_config("paper"))))

    def known(key: str) -> bool:  # a leaf, or a section of leaves (data.synthetic); stageN is either stage
        names = [key.replace("stageN", s) for s in ("stage1", "stage2")] if "stageN" in key else [key]
        return all(n in keys or any(k.startswith(n + ".") for k in keys) for n in names)

    named = {m for p in READMES for m in KEY.findall(p.read_text())}
    assert len(named) > 40  # the scan finds the keys
    assert sorted(k for k in named - NOT_KEYS if not known(k)) == []
    assert all(not known(k) for k in NOT_KEYS)  # still not keys, or the exception is stale


def test_every_make_target_the_readmes_show_is_in_the_makefile():
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    shown = {t for p in READMES for line in _command_lines(p.read_text())
             for t in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", line)}
    assert {"demo", "test"} <= shown  # the README's two commands
    assert sorted(shown - targets) == []


def test_every_source_file_the_readmes_name_exists():
    # results/ paths are a run's outputs, made when it runs; everything else named is in the repository
    pattern = r"(?<![\w./-])((?:tests|trueface|jobs|docker|search_spaces|\.ci)/[\w./-]*\w)"
    named = {path for p in READMES for path in re.findall(pattern, p.read_text())}
    assert len(named) > 40  # the scan finds them
    assert sorted(path for path in named if not (REPO / path).exists() and not (REPO / "docker" / path).exists()) == []


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for a markdown file's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading's anchor numbered (-1, -2, ...)."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_section_link_in_the_readmes_and_the_record_lands_on_a_heading():
    # README.md and results/benchmarks.md link into each other's sections (the record moved out of
    # the README): a renamed heading would leave a link that goes nowhere
    files = [*READMES, REPO / "results" / "README.md", REPO / "results" / "benchmarks.md"]
    anchors = {p.resolve(): _anchors(p.read_text()) for p in files}
    links, broken = 0, []
    for p in files:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", p.read_text()):
            dest = (p.parent / target).resolve() if target else p.resolve()
            links += 1
            if anchor not in anchors.get(dest, set()):
                broken.append(f"{p.relative_to(REPO)}: {target}#{anchor}")
    assert links > 20  # the scan finds them
    assert broken == []
