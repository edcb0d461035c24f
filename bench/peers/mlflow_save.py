"""Save a LightGBM text model as an MLflow model (the lightgbm flavor, which also gives pyfunc).

Runs inside the mlflow venv (bench/.venvs/mlflow):  python mlflow_save.py MODEL.txt OUT_DIR
"""

from __future__ import annotations

import sys

import lightgbm as lgb
import mlflow.lightgbm

booster = lgb.Booster(model_file=sys.argv[1])
# pip_requirements given: skips mlflow's requirement inference (which loads the model in a subprocess).
mlflow.lightgbm.save_model(booster, sys.argv[2], pip_requirements=[f"lightgbm=={lgb.__version__}"])
print(sys.argv[2])
