"""Helpers shared by the stage tests: the tiny digits / ResNet-8 config and the MLflow runs of a test store."""

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


def mlflow_runs(root: Path, experiment: str = "test-stages") -> pd.DataFrame:
    """Every run of `experiment` in the store `root/mlflow.db` (status, tags, params, metrics)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    try:
        return mlflow.search_runs(experiment_names=[experiment])
    finally:
        mlflow.set_tracking_uri(None)
