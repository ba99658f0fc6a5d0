"""Every command-line entry point of the project, and a way to get the parser each one builds."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Iterator
from unittest import mock


def _annotate(argv):
    from pipeline.annotate import parse_args

    return parse_args(argv)


def _train(argv):
    from train.train import parse_args

    return parse_args(argv)


def _evaluate(argv):
    from train.evaluate import parse_args

    return parse_args(argv)


def _manifests(argv):
    from manifests.__main__ import main

    return main(argv)


def _samples(argv):
    from demo.samples import main

    return main(argv)


def _tiny_base(argv):
    from demo.tiny_base import main

    return main(argv)


#: name -> (entry point taking argv, the arguments every call needs besides the one tried)
CLIS: dict[str, tuple[Callable[[list[str]], Any], list[str]]] = {
    "annotate": (_annotate, ["--input", "in", "--output", "out"]),
    "train": (_train, ["--manifest", "m", "--condition", "canny", "--pretrained_model_name_or_path", "sd"]),
    "evaluate": (_evaluate, ["--controlnet", "c", "--pretrained_model_name_or_path", "sd", "--manifest", "m",
                             "--condition", "canny"]),
    "manifests": (_manifests, ["inspect", "m"]),
    "samples": (_samples, ["circles", "out", "--count", "1"]),
    "tiny_base": (_tiny_base, ["--output", "out"]),
}


class _Captured(Exception):
    pass


def parser_of(name: str) -> argparse.ArgumentParser:
    """The top-level parser the CLI builds, caught as it is about to parse (nothing runs)."""
    entry, argv = CLIS[name]
    seen: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            entry(list(argv))
        except _Captured:
            pass
    assert seen, f"{name} built no argparse parser"
    return seen[0]


def all_actions(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, argparse.Action]]:
    """Every argument of the parser and of its sub-commands, with the parser it belongs to."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield parser, action
