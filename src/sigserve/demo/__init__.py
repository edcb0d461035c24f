"""The pieces of ``sigserve demo``: a synthetic market and a small model trained on it."""

from .market import generate_ohlcv, simulate_market, write_csv
from .train import DemoTrainResult, train_demo_model

__all__ = ["DemoTrainResult", "generate_ohlcv", "simulate_market", "train_demo_model", "write_csv"]
