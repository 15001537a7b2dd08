"""The error hierarchy and its one-line summaries."""

from __future__ import annotations

import pytest

from pipeline import errors
from pipeline.errors import (
    CheckpointMismatch,
    ClusterError,
    FingerprintMismatch,
    InputError,
    RecipeError,
    RunError,
    SchemaError,
    ShardError,
    StageFailed,
    UserError,
    WeightsError,
    one_line,
)


@pytest.mark.parametrize("cls", [RecipeError, InputError, FingerprintMismatch, SchemaError, ClusterError])
def test_user_errors_exit_2(cls):
    assert issubclass(cls, UserError) and cls("x").exit_code == 2


@pytest.mark.parametrize("cls", [StageFailed, ShardError, CheckpointMismatch, WeightsError])
def test_run_errors_exit_1(cls):
    assert issubclass(cls, RunError) and not issubclass(cls, UserError) and cls("x").exit_code == 1


def test_every_error_class_lives_in_the_errors_module():
    import pipeline.cli  # noqa: F401 - imports every layer's modules that raise
    from pipeline import workflow

    for name in workflow.STAGES:
        workflow.stage_class(name)
    classes = [c for c in errors.PipelineError.__subclasses__()]
    seen = set()
    while classes:
        cls = classes.pop()
        seen.add(cls)
        classes += cls.__subclasses__()
    assert {c.__module__ for c in seen} == {"pipeline.errors"}


class _RayTaskError(Exception):
    """Stands in for ray.exceptions.RayTaskError: a traceback as its text, the original as `cause`."""

    def __init__(self, cause: BaseException):
        super().__init__("ray::task() (pid=1)\nTraceback (most recent call last):\n  File ...\nValueError: x")
        self.cause = cause


@pytest.mark.parametrize(
    "err, typed, line",
    [
        (ValueError("bad input\nsecond line"), True, "ValueError: bad input"),
        (ValueError("bad input\nsecond line"), False, "bad input"),
        (KeyError(), True, "KeyError"),
        (_RayTaskError(OSError("disk full")), True, "OSError: disk full"),
        (RuntimeError("Traceback (most recent call last):\n  File 'a.py'\nZeroDivisionError: division"), True,
         "ZeroDivisionError: division"),
    ],
)  # fmt: skip
def test_one_line(err, typed, line):
    assert one_line(err, typed) == line
