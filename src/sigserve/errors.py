"""The one error tree of sigserve.

Every refusal that a user can see is a :class:`SigserveError` with a stable ``error_code`` from
DESIGN.md. Callers branch on the code, never on the message. This module has no web imports: the
HTTP layer maps ``http_status`` at the edge, and the CLI prints ``error_code: message`` and exits
non-zero.

=========================== ====== ==========================================================
error_code                  HTTP   raised when
=========================== ====== ==========================================================
validation_error            422    malformed input: bad interval, timestamp, window, file
unauthorized                401    missing or wrong bearer token
signal_not_found            404    unknown signal_id
model_not_found             404    unknown model name, version or alias
signal_retired              409    the signal definition is retired
model_lifecycle_refused     409    the model version is retired or rejected_by_operator
model_artifact_missing      409    the version has no artifact sha, or its file is absent
feature_not_registered      409    the model needs a feature that is not ``registered``
feature_value_missing       409    no feature row at that ts
feature_spec_mismatch       409    a feature row's feature_key comes from another spec than the
                                   one the model was trained on (its card's spec hash)
backfill_window_too_large   413    the window holds more bars than SIGSERVE_MAX_BACKFILL_ROWS
risk_rejected               403    ``risk_check: true`` and the decision fails a risk check
                                   (the checks, pass or fail, in ``details.checks``)
explanation_unsupported     409    ``explain: true`` and the served model's flavor has no
                                   native TreeSHAP (only LightGBM and XGBoost have)
artifact_corrupt            502    the file's sha256 differs from the registered one
store_unavailable           503    the database cannot be reached
bus_unavailable             503    the message bus (NATS) cannot be reached or refused a request
deadline_exceeded           504    the request's latency budget ran out
internal_error              500    a bug; details carry the request id, never a traceback
=========================== ====== ==========================================================

Usage::

    from sigserve.errors import SignalNotFound
    raise SignalNotFound("no signal 'abc'", details={"signal_id": "abc"})

Third-party exceptions are translated where they cross into sigserve, with ``raise ... from exc``
so that the cause stays in the logs but never reaches a caller.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SigserveError(Exception):
    """Base of every error a caller may see. Subclasses fix ``code`` and ``http_status``."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def to_envelope(self, request_id: str = "") -> dict[str, Any]:
        """The frozen error envelope of DESIGN.md."""
        return {
            "error_code": self.code,
            "message": self.message,
            "details": self.details,
            "request_id": request_id,
        }

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ValidationError(SigserveError):
    code = "validation_error"
    http_status = 422


class Unauthorized(SigserveError):
    code = "unauthorized"
    http_status = 401


class SignalNotFound(SigserveError):
    code = "signal_not_found"
    http_status = 404


class ModelNotFound(SigserveError):
    code = "model_not_found"
    http_status = 404


class SignalRetired(SigserveError):
    code = "signal_retired"
    http_status = 409


class ModelLifecycleRefused(SigserveError):
    code = "model_lifecycle_refused"
    http_status = 409


class ModelArtifactMissing(SigserveError):
    code = "model_artifact_missing"
    http_status = 409


class FeatureNotRegistered(SigserveError):
    code = "feature_not_registered"
    http_status = 409


class FeatureValueMissing(SigserveError):
    code = "feature_value_missing"
    http_status = 409


class FeatureSpecMismatch(SigserveError):
    code = "feature_spec_mismatch"
    http_status = 409


class RiskRejected(SigserveError):
    """A decision refused by a risk check (``risk_check: true``): the request was understood and
    authorised, but the decision it would give is forbidden (403), not a bad request."""

    code = "risk_rejected"
    http_status = 403


class ExplanationUnsupported(SigserveError):
    """``explain: true`` for a model whose flavor has no native TreeSHAP. 409, like the other
    refusals caused by the state of the served model (not by the request's shape, which is valid:
    the same request explains once a LightGBM or XGBoost version serves)."""

    code = "explanation_unsupported"
    http_status = 409


class BackfillWindowTooLarge(SigserveError):
    code = "backfill_window_too_large"
    http_status = 413


class ArtifactCorrupt(SigserveError):
    code = "artifact_corrupt"
    http_status = 502


class StoreUnavailable(SigserveError):
    code = "store_unavailable"
    http_status = 503


class BusUnavailable(SigserveError):
    """The stream worker's and ``sigserve config``'s broker (NATS) is unreachable or refused a
    request. Not an HTTP answer (the HTTP service uses no bus), so not in ``ERROR_CODES`` until
    DESIGN.md's table lists it."""

    code = "bus_unavailable"
    http_status = 503


class DeadlineExceeded(SigserveError):
    code = "deadline_exceeded"
    http_status = 504


class InternalError(SigserveError):
    code = "internal_error"
    http_status = 500


ERROR_CODES: dict[str, type[SigserveError]] = {
    cls.code: cls
    for cls in (
        ValidationError,
        Unauthorized,
        SignalNotFound,
        ModelNotFound,
        SignalRetired,
        ModelLifecycleRefused,
        ModelArtifactMissing,
        FeatureNotRegistered,
        FeatureValueMissing,
        FeatureSpecMismatch,
        RiskRejected,
        ExplanationUnsupported,
        BackfillWindowTooLarge,
        ArtifactCorrupt,
        StoreUnavailable,
        DeadlineExceeded,
        InternalError,
    )
}


def missing_extra(module: str, extra: str) -> ValidationError:
    """The error for an optional dependency that is not installed, naming the extra to add."""
    return ValidationError(
        f"this needs the optional package '{module}': pip install 'sigserve[{extra}]'",
        details={"module": module, "extra": extra},
    )
