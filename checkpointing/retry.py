"""One retry layer, around whole idempotent storage operations, bounded in total time.

Clients retry too (botocore a few attempts in "standard" mode, gcsfs up to 6 times on 5xx); we keep
those small (see `storage.default_storage_options`) because retry layers multiply. This layer
repeats a whole read, write, listing or delete with exponential backoff and jitter until it
succeeds or `timeout_s` has passed, then re-raises the last error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
    ValueError, TypeError, KeyError, AttributeError, NotImplementedError, MemoryError,
)
"""Errors that another attempt cannot fix: a missing object, denied access, a programming error.
(s3fs turns AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch and ExpiredToken into
PermissionError and NoSuchBucket into FileNotFoundError.)"""

PERMANENT_ERROR_NAMES = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "DefaultCredentialsError", "RefreshError", "CorruptCheckpoint",
})
"""Errors of clients we do not import here (botocore, google-auth) or of our own that no retry
can fix, by class name: no credentials found, credentials refused, bytes that do not match."""

PERMANENT_MESSAGES = ("Forbidden:", "AccessDenied", "NoSuchBucket", "InvalidAccessKeyId",
                      "SignatureDoesNotMatch")
"""Messages of the plain OSErrors that gcsfs (403) and s3fs (unmapped codes) raise for refusals."""

PERMANENT_HTTP_CODES = frozenset({400, 401, 403, 404})
"""HTTP statuses of a client error (gcsfs's HttpError has `.code`) that no retry can fix."""


def is_transient(error: BaseException) -> bool:
    """True for errors worth another attempt: network faults, 5xx, throttling, short reads.

    False for missing or refused credentials, a missing bucket, denied access, a checksum that
    does not match and programming errors: those fail at once, naming the cause."""
    if not isinstance(error, Exception):
        return False  # KeyboardInterrupt, SystemExit, DCP's CheckpointException: not ours to retry
    if isinstance(error, PERMANENT_ERRORS):
        return False
    if any(cls.__name__ in PERMANENT_ERROR_NAMES for cls in type(error).__mro__):
        return False
    if getattr(error, "code", None) in PERMANENT_HTTP_CODES:
        return False
    text = str(error)
    return not (isinstance(error, OSError) and any(m in text for m in PERMANENT_MESSAGES))


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        # Only the exception type: messages may echo request URLs or headers.
        log.warning("%s: attempt %d failed (%s); retrying", what, state.attempt_number,
                    type(error).__name__)

    return before_sleep


def retrying(timeout_s: float, what: str = "storage operation") -> Callable[[Callable[..., T]],
                                                                           Callable[..., T]]:
    """Decorator: call the function until it succeeds, for at most `timeout_s` seconds.

    Raises the last error once the time is spent or at once for a permanent error.
    """

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        def call(*args: Any, **kwargs: Any) -> T:
            retryer = Retrying(
                stop=stop_after_delay(max(0.0, timeout_s)),
                wait=wait_random_exponential(multiplier=0.2, max=5.0),
                retry=retry_if_exception(is_transient),
                before_sleep=_log_retry(what),
                reraise=True,
            )
            return retryer(fn, *args, **kwargs)

        return call

    return wrap
