"""What the `ddim` command accepts and how it fails: one-line errors with their exit status, validated flag values,
model names resolved against the store."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

USAGE, FAILURE = 2, 1


class CliError(Exception):
    """A user's error or a failure, told in one line (`ddim: error: MESSAGE`) with exit status `status`."""

    def __init__(self, message: str, status: int = FAILURE) -> None:
        super().__init__(message)
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse's usage errors in one line, not the usage text and then the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"ddim: error: {message} (see '{self.prog} --help')\n")


def number(kind: Callable[[str], float], low: float | None = None, high: float | None = None,
           strict: bool = False) -> Callable[[str], float]:
    """An argparse type: kind(text) within [low, high] ((low, high] where strict)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value
    return parse


COUNT, NON_NEGATIVE = number(int, 1), number(int, 0)
POSITIVE = number(float, 0, strict=True)
SHARE = number(float, 0.0, 1.0)


def counts(text: str, flag: str, allow_none: bool = False) -> tuple[int, ...]:
    """A comma-separated list of counts, e.g. 10,20,50 ('' where allow_none); a usage error naming the flag
    otherwise."""
    try:
        values = tuple(int(COUNT(v.strip())) for v in text.split(",") if v.strip())
    except argparse.ArgumentTypeError as e:
        raise CliError(f"argument {flag}: {e}", USAGE) from None
    if not values and not allow_none:
        raise CliError(f"argument {flag}: no numbers in {text!r}", USAGE)
    return values


def store_of(args: argparse.Namespace) -> Path:
    """--model-store, or DDIM_MODEL_STORE, or ./model_store (for the commands that take no other settings)."""
    return Path(args.model_store or os.environ.get("DDIM_MODEL_STORE", "model_store"))


def model_folder(store: Path, name: str | None, default: str) -> Path:
    """The folder of model `name` in the store (of the default model, or else the store's first, when None); a usage
    error naming the models there when it has no such model. Only names are read: no other folder is opened."""
    from app.models import ModelStoreError, discover

    try:
        names = discover(store)
    except ModelStoreError as e:
        raise CliError(str(e)) from None
    if name is None:
        name = default if default in names or not names else names[0]
    if name not in names:
        raise CliError(f"no model {name!r} in {store} (found: {', '.join(names) or 'none'})", USAGE)
    return store / name
