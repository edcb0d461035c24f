"""sigserve: trained trading models in, live and auditable trading signals out."""

__version__ = "0.1.0"
