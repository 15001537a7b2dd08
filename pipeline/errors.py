"""Every error the pipeline raises on purpose, in one hierarchy (this module imports nothing else
from the project, so every layer can raise them).

    PipelineError
    ├── UserError            something the user gave cannot be used: `dalle` prints one line, exits 2
    │   ├── RecipeError          a recipe or an override
    │   ├── InputError           a URL list, weights, an upstream output, a command-line value
    │   ├── FingerprintMismatch  a stage folder written by another recipe or input
    │   ├── SchemaError          a table or record that breaks its contract in `schemas/`
    │   └── ClusterError         a cluster that cannot be reached or cannot run the recipe
    └── RunError             the run went wrong: `dalle` prints one line, exits 1 (rerun to retry)
        ├── StageFailed          shard tasks or training of a stage gave up after their retries
        ├── ShardError           a shard that could not be read, or does not hold what its ledger says
        │   └── DamagedShard         its bytes are damaged (truncated, corrupt, short): no retry mends it
        ├── CheckpointMismatch   a training checkpoint this run cannot resume
        └── WeightsError         weights that cannot be consolidated into a model

`one_line` is the one way an error becomes the line a user (or a failure record) sees.
"""

from __future__ import annotations

TRACEBACK = "Traceback (most recent call last)"


class PipelineError(Exception):
    """Base of the errors the pipeline raises on purpose."""

    exit_code = 1


class UserError(PipelineError):
    """Something the user gave (recipe, input, command line) cannot be used; one line, exit 2."""

    exit_code = 2


class RecipeError(UserError, ValueError):
    """A recipe (or an override) that cannot be used; the message names the field."""


class InputError(UserError, ValueError):
    """A user input (URL list, weights, upstream output, command-line value) that cannot be used."""


class FingerprintMismatch(UserError, ValueError):
    """The stage folder holds output made from another config or input."""


class SchemaError(UserError, ValueError):
    """A table or record does not match its schema (missing column, wrong type)."""


class ClusterError(UserError):
    """A cluster that cannot be reached, refuses us, or cannot run the recipe."""


class RunError(PipelineError):
    """The run went wrong after it started; rerunning the same command retries it. Exit 1."""


class StageFailed(RunError):
    """Some shard tasks (or the training) of a stage gave up after their retries."""


class ShardError(RunError):
    """A shard that could not be read (the store failed, a loader worker died) or does not hold
    what its ledger record says."""


class DamagedShard(ShardError):
    """A shard whose bytes are not what its ledger record says (truncated, corrupted, fewer samples):
    every read gives the same error, so training ends at once instead of restarting into it again."""


class CheckpointMismatch(RunError):
    """A training checkpoint that cannot be resumed by this run."""


class WeightsError(RunError):
    """Weights that cannot be consolidated into the model (missing or unknown tensors)."""


def one_line(err: BaseException, typed: bool = True) -> str:
    """An error in one line, for users and failure records: `Type: message` (just the message
    when not `typed`, as the cause inside a sentence that already says what failed).

    A Ray task error stands for the exception raised in the worker (its `cause`); a message that
    is a whole traceback (Ray Train's worker failures) is summarised by its last line, which names
    the exception; any other message by its first line. An empty message is the type's name."""
    cause = getattr(err, "cause", None) or err
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    if not lines:
        return type(cause).__name__
    if any(ln.startswith(TRACEBACK) for ln in lines):
        return lines[-1]
    return f"{type(cause).__name__}: {lines[0]}" if typed else lines[0]
