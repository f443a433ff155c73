"""Helpers shared by the stage tests: the tiny digits / ResNet-8 config, the MLflow runs of a test store, and an
interruption after the first training epoch (resume tests)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def tiny_config(tmp_path: Path, **optim) -> dict:
    """Seconds-long stage config: 384 digits, a width-4 ResNet-8, 2 epochs, its own MLflow store in tmp_path."""
    return {
        "seed": 3,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64, "test_batch_size": 200, "train_subset": 384},
        "model": {"arch": "resnet8", "width": 4, "act_bits": 4},
        "optim": {"epochs": 2, "lr": 0.05, "milestones": [1], **optim},
        "bsq": {"requant_interval": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test-stages"},
    }


def untracked_config(tmp_path: Path, **optim) -> dict:
    """`tiny_config` with MLflow off, for tests about files and inputs rather than runs."""
    return {**tiny_config(tmp_path, **optim), "tracking": {"enabled": False}}


def mlflow_runs(root: Path, experiment: str = "test-stages") -> pd.DataFrame:
    """Every run of `experiment` in the store `root/mlflow.db` (status, tags, params, metrics)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    try:
        return mlflow.search_runs(experiment_names=[experiment])
    finally:
        mlflow.set_tracking_uri(None)


def interrupt_after_first_epoch(monkeypatch) -> None:
    """Make the second `train_one_epoch` call raise KeyboardInterrupt, as Ctrl-C during the second epoch."""
    from bsq import engine

    real = engine.train_one_epoch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", flaky)
