"""Errors of the training stage. Each message names the thing and the fix.

They subclass ValueError, so the CLI turns them into one line and exit 2 without knowing
them. What happens to a generated playbook (no YAML, refused by the gate, failed to run)
is data in an evaluation record, not an exception."""


class TrainError(ValueError):
    """Base class for training-stage problems a user can fix."""


class ModelDirError(TrainError):
    """A model directory that is missing or incomplete; the message names the path and
    what is missing."""


class NoTrainingData(TrainError):
    """No usable episodes where the config points; the message says how to collect them."""


class EngineUnavailable(TrainError):
    """A rollout engine that cannot run here (vLLM without a GPU or not installed)."""
