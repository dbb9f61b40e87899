"""Every link and command in README.md and docs/ resolves: relative links to files that exist and to anchors that
their headings make; ``make`` targets of the Makefile; ``mixinfer`` sub-commands and their flags; repository paths
named in code."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from service.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md"), REPO / "examples" / "README.md"])
#: paths that commands write, named in the docs before they exist in a fresh clone (the CIFAR-10 bundles are built
#: on a GPU host by the README's own commands)
GENERATED = {"bench/results.md", "runs", "model_store/cifar10-mixup", "model_store/cifar10-iat"}
#: flags whose value is a path a command creates
_OUTPUT_FLAGS = ("--out", "--run-dir", "-o", "--output")
_TOP_DIRS = ("service/", "tests/", "bench/", "deploy/", "docs/", "examples/", "model_store/", ".ci/")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # link text only
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    text = _FENCE.sub("", path.read_text())
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def _prose(path: Path) -> str:
    return _FENCE.sub("", path.read_text())


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_relative_link_and_anchor_resolves(doc: Path):
    broken = []
    for target in _LINK.findall(_prose(doc)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not broken, "\n".join(broken)


def _code(path: Path) -> list[str]:
    """Shell lines of fenced blocks (continuations joined) and inline code spans."""
    text = path.read_text()
    lines: list[str] = []
    for block in _FENCE.findall(text):
        lines.extend(block.replace("\\\n", " ").splitlines())
    lines.extend(_INLINE.findall(_FENCE.sub("", text)))
    return lines


def _make_targets() -> set[str]:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.$()/-]+):", makefile, re.M))
    return {t.replace("$(SERVE_VENV)", ".venv-serve").replace("$(VENV)", ".venv") for t in targets}


def _words(line: str) -> list[str]:
    line = line.split(" #", 1)[0]
    try:
        return shlex.split(line, comments=False)
    except ValueError:
        return line.split()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


_OPERATORS = ("|", "||", "&&", ";", "&", "then", "do", "time", "exec", "sudo", "$(")


def _at_command_position(words: list[str], i: int) -> bool:
    """``words[i]`` is what a shell runs: the first word after environment assignments, or after an operator
    (not an argument such as ``kubectl -n mixinfer``)."""
    j = i - 1
    while j >= 0 and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[j]):
        j -= 1
    return j < 0 or words[j] in _OPERATORS or words[j].endswith(("$(", "`"))


def _commands(words: list[str], name: str) -> list[list[str]]:
    """Each invocation of ``name`` (or a path ending in /name) in a line's words, up to a shell operator."""
    found = []
    for i, w in enumerate(words):
        if (w == name or w.endswith(f"/{name}")) and _at_command_position(words, i):
            args = []
            for a in words[i + 1 :]:
                if a in ("|", "||", "&&", ";", "&", ">", "2>&1") or a.startswith((">", "|")):
                    break
                args.append(a)
            found.append(args)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_make_target_and_mixinfer_command_and_flag_exists(doc: Path):
    targets = _make_targets()
    subcommands = _subcommands()
    broken = []
    for line in _code(doc):
        words = _words(line)
        for args in _commands(words, "make"):
            for a in args:
                if a.startswith("-") or "=" in a:
                    continue
                if a not in targets:
                    broken.append(f"`{line}`: no make target {a!r}")
        for args in _commands(words, "mixinfer"):
            if not args or not re.fullmatch(r"[a-z][a-z0-9-]*", args[0]):  # flags, placeholders, "mixinfer x: msg"
                continue
            sub = subcommands.get(args[0])
            if sub is None:
                broken.append(f"`{line}`: no mixinfer sub-command {args[0]!r}")
                continue
            flags = {s for a in sub._actions for s in a.option_strings}
            for a in args[1:]:
                flag = a.split("=", 1)[0]
                if flag.startswith("--") and flag not in flags:
                    broken.append(f"`{line}`: mixinfer {args[0]} has no flag {flag}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_repository_path_named_in_code_exists(doc: Path):
    broken = []
    lines = [_words(line) for line in _code(doc)]
    made = {w[i + 1] for w in lines for i in range(len(w) - 1) if w[i] in _OUTPUT_FLAGS}  # a command's outputs
    for line, words in zip(_code(doc), lines, strict=True):
        for raw in words:
            if raw in made:
                continue
            word = raw.strip("'\"(),;:[]")
            word = word.split("@", 1)[1] if "@" in word else word  # curl's -F name=@file, --data-binary @file
            if not word.startswith(_TOP_DIRS) or re.search(r"[<>*{}$|]|\.\.\.", word):
                continue
            path = word.split(":", 1)[0].split("#", 1)[0]
            if path in GENERATED or any(path.startswith(g + "/") for g in GENERATED):
                continue
            if not (REPO / path).exists():
                broken.append(f"`{line}`: no {path}")
    assert not broken, "\n".join(broken)


def test_the_checks_catch_what_they_are_for(tmp_path: Path):
    """The helpers find a broken anchor, target, sub-command and flag (so a passing run means something)."""
    page = tmp_path / "page.md"
    page.write_text("# Quick start\n## The HTTP service (`mixinfer serve`)\n## Quick start\n")
    assert anchors(page) == {"quick-start", "the-http-service-mixinfer-serve", "quick-start-1"}
    assert _slug("Configuration (environment, prefix `MIXINFER_`)") == "configuration-environment-prefix-mixinfer_"
    assert "serve" in _make_targets() and "nope" not in _make_targets()
    assert _commands(_words("make serve & curl x | mixinfer predict --json a.png"), "mixinfer") == [
        ["predict", "--json", "a.png"]
    ]
    assert _commands(_words("kubectl -n mixinfer apply -f x.yaml"), "mixinfer") == []
    assert _commands(_words("MIXINFER_MODEL_DIR=s .venv/bin/mixinfer serve &"), "mixinfer") == [["serve"]]
    assert "--api-key" in {s for a in _subcommands()["predict"]._actions for s in a.option_strings}
