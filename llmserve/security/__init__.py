"""Security shared by the router and the worker (torch-free; docs/SECURITY.md).

- ``files``: files re-read when they change (certificates, API keys, fleet secrets).
- ``tls``: gRPC server credentials that reload their certificate files, client credentials
  that tell their channels to re-dial when the files change, and peer checks (mTLS, loopback).
- ``api_keys``: the router's API-key file (SHA-256 digests compared in constant time, model
  allow-lists, per-key rate limits) and ``python -m llmserve.security.api_keys new``.
- ``rate_limit``: token buckets per API key on requests/s and tokens/s.
- ``records``: validation of the worker records read from the state store (schema, types,
  ranges, heartbeat age) and their optional HMAC-SHA256 signature with a fleet secret.
- ``control``: the worker's interceptor that serves ``WorkerControl`` only to mTLS-authenticated
  routers and local callers.
- ``flags``: the command-line flags of these settings, shared by router and worker.

Nothing read from the network or from Redis is unpickled or evaluated: records are JSON,
checked field by field before use.
"""
