"""The pieces of ``sigserve demo``: a synthetic market (the model is trained by ``sigserve.train``)."""

from .market import generate_ohlcv, simulate_market, write_csv

__all__ = ["generate_ohlcv", "simulate_market", "write_csv"]
