"""The worker's error interceptor: :class:`llmserve.grpc_errors.ErrorInterceptor` with the
worker's status mapping (``errors.status_for``)."""

from __future__ import annotations

import logging

from gpu_worker.server.errors import status_for
from llmserve import grpc_errors


class ErrorInterceptor(grpc_errors.ErrorInterceptor):
    """Maps worker and engine exceptions to gRPC statuses (see ``errors.py``)."""

    def __init__(self) -> None:
        super().__init__(status_for, logging.getLogger(__name__))
