"""The Tinker-compatible HTTP gateway: the official Tinker SDK's calls become bus events.

A stateless process (``multilora gateway``; run N of them): a client of the ``tinker`` SDK points
``base_url`` here and runs its own training loop; each call becomes an event on the bus plus a
durable future (:mod:`events.futures`), and ``retrieve_future`` answers from Redis alone. See
``docs/TINKER.md`` for what is supported. Modules, outside in:

- :mod:`~orchestrator.gateway.server` — the HTTP server and the process (``main``);
- :mod:`~orchestrator.gateway.routes` — the HTTP contract and the start-up endpoints
  (:class:`Gateway`); :mod:`~orchestrator.gateway.training`, :mod:`~orchestrator.gateway.sampling`
  — the endpoints that make futures; :mod:`~orchestrator.gateway.call` — what a route gets;
- :mod:`~orchestrator.gateway.wire`, :mod:`~orchestrator.gateway.protowire` — the SDK's JSON and
  protobuf bodies; :mod:`~orchestrator.gateway.datums` — Tinker datums → the trainer's alignment;
- :mod:`~orchestrator.gateway.futures_api` — submit (event + future, atomically, with the
  tenant's limits) and retrieve; :mod:`~orchestrator.gateway.render` — results → responses;
- :mod:`~orchestrator.gateway.records`, :mod:`~orchestrator.gateway.sessions`,
  :mod:`~orchestrator.gateway.tenants` — models, sampling sessions, sessions, API keys;
- :mod:`~orchestrator.gateway.config` — :class:`GatewayConfig`.
"""
