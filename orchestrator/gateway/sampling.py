"""The sampling routes: sampling sessions and ``asample`` → ``rollout.sample`` tasks.

A sampling session (``create_sampling_session``, or the one ``save_weights_and_get_sampling_client``
makes) names the weights its samples use: a ``tinker://…/sampler_weights/…`` path of the tenant
(resolved through the path index to the adapter, registration, version and artifact URI) or the
base model. ``asample`` resolves the weights *now* (so a path must have been saved), maps
Tinker's ``SamplingParams`` to the bus's :class:`~events.specs.SamplingSpec`
(:func:`orchestrator.gateway.wire.sampling_spec`) and publishes a
:class:`~events.schema.SampleTask` on ``rollout.tasks``, which one rollout worker serves; its
future holds the sequences. Request ids are ``<sampling session>.<seq_id>`` (the SDK numbers a
sampling client's requests), else fresh.
"""

from __future__ import annotations

import redis

from events.codec import new_id
from events.futures import PathRecord
from events.schema import SampleTask
from events.streams import Streams
from orchestrator.gateway import wire
from orchestrator.gateway.call import Call, Limits
from orchestrator.gateway.errors import bad_request
from orchestrator.gateway.futures_api import Futures
from orchestrator.gateway.records import Records, SamplerRecord
from orchestrator.gateway.render import Reply, json_reply
from orchestrator.gateway.sessions import Sessions


class SamplingRoutes:
    """The sampling endpoints over one namespace (see the module doc)."""

    def __init__(
        self,
        client: redis.Redis,
        streams: Streams,
        records: Records,
        sessions: Sessions,
        futures: Futures,
        limits: Limits,
    ) -> None:
        self.client = client
        self.streams = streams
        self.records = records
        self.sessions = sessions
        self.futures = futures
        self.limits = limits

    def create_sampling_session(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.CreateSamplingSession)
        self.sessions.require_active(call.tenant, body.session_id)
        if body.model_path:
            self._sampler_weights(call.tenant, body.model_path, "model_path")
        elif body.base_model != self.limits.base_model:
            fix = f"give a model_path or {self.limits.base_model!r}"
            raise bad_request("base_model", f"{body.base_model!r}; {fix}")
        sampler = SamplerRecord(
            sampler_id=f"{body.session_id}-sampler-{body.sampling_session_seq_id}",
            tenant=call.tenant,
            base_model=self.limits.base_model,
            model_path=body.model_path or "",
            session=body.session_id,
        )
        key = self.records.keys.sampler(sampler.sampler_id)
        self.client.hset(key, mapping=self.records.sampler_fields(sampler))
        return json_reply(
            {"type": "create_sampling_session", "sampling_session_id": sampler.sampler_id}
        )

    def get_sampler(self, call: Call) -> Reply:
        sampler = self.records.sampler(call.tenant, call.param)
        return json_reply(
            {
                "sampler_id": sampler.sampler_id,
                "base_model": sampler.base_model,
                "model_path": sampler.model_path or None,
            }
        )

    def _sampler_weights(self, tenant: str, model_path: str, field: str) -> PathRecord:
        path = self.records.path(tenant, model_path, field=field)
        if path.kind != "sampler":
            raise bad_request(
                field, f"{model_path!r} is a training checkpoint; sample from sampler_weights"
            )
        return path

    def asample(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.Sample)
        body.check_supported()
        model_path, scope = body.model_path or "", ""
        if body.sampling_session_id:
            sampler = self.records.sampler(call.tenant, body.sampling_session_id)
            model_path, scope = sampler.model_path, sampler.sampler_id
        elif not model_path and body.base_model != self.limits.base_model:
            raise bad_request(
                "base_model",
                f"{body.base_model!r}; give a model_path, a sampling_session_id or "
                f"{self.limits.base_model!r}",
            )
        prompt_ids = body.prompt.token_ids("prompt")
        spec, seed = wire.sampling_spec(body.sampling_params, self.limits.default_max_tokens)
        adapter = registration = uri = ""
        version = 0
        if model_path:
            path = self._sampler_weights(call.tenant, model_path, "model_path")
            adapter, registration = path.model, path.registration_id
            version, uri = path.version, path.uri
        if scope and body.seq_id is not None:
            request_id = f"{scope}.{body.seq_id}"
        else:
            request_id = f"sample.{new_id()}"
        event = SampleTask(
            adapter=adapter,
            registration_id=registration,
            request_id=request_id,
            version=version,
            weights_uri=uri,
            prompt_ids=prompt_ids,
            num_samples=body.num_samples,
            sampling=spec,
            seed=seed,
            prompt_logprobs=bool(body.prompt_logprobs),
        )
        self.futures.submit(
            call.tenant,
            request_id,
            kind="sample",
            model=adapter,
            events=[(self.streams.tasks, event)],
        )
        ids = [f"{request_id}.{i}" for i in range(body.num_samples)]
        return json_reply(
            {"request_id": request_id, "model_id": adapter or None, "sample_sequence_ids": ids}
        )
