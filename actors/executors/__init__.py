"""Executors: the code that performs one step. One module per capability; all share
:mod:`actors.executors.base`. Loaded by import path so pools can name them in serve.yaml."""

from actors.executors.base import Executor, StepInput, StepOutcome, load_executor

__all__ = ["Executor", "StepInput", "StepOutcome", "load_executor"]
