"""The router's error interceptor: :class:`llmserve.grpc_errors.ErrorInterceptor` with the
router's status mapping (``errors.status_for``)."""

from __future__ import annotations

import logging

from llmserve import grpc_errors
from router.errors import status_for


class ErrorInterceptor(grpc_errors.ErrorInterceptor):
    """Maps router exceptions to gRPC statuses (see ``errors.py``)."""

    def __init__(self) -> None:
        super().__init__(status_for, logging.getLogger(__name__))
