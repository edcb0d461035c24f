"""Champion / challenger / shadow routing of signal definitions (see :mod:`.rollout`)."""

from .hashing import bucket, challenger_mask, trading_date

__all__ = ["bucket", "challenger_mask", "trading_date"]
