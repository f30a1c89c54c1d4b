"""The training routes: each SDK call becomes a record write, a bus event and a future.

=============================  ============================================================
route                          event (stream) · future kind
=============================  ============================================================
``create_model``               ``adapter.register_requested`` (ingress; the model id is the
                               adapter name and registration id, ``driver="client"``, rank
                               from ``lora_config``, the operator's alpha and step budget,
                               ``seed`` from ``lora_config.seed``) · ``create_model``
``forward_backward``           ``train.forward_backward`` (train.requests; protobuf body;
                               ``forward_only`` → ``backward=False``) · ``forward_backward``
                               / ``forward``
``optim_step``                 ``train.optim_step`` (``AdamParams`` one to one) ·
                               ``optim_step``
``save_weights_for_sampler``   ``train.save_weights(kind="sampler")`` · without a name the
                               answer also carries a new sampling session on that path
``save_weights``               ``train.save_weights(kind="state")`` · ``save_weights``
``load_weights``               ``train.load_weights`` with the checkpoint's ``uri`` from the
                               path index (the tenant's ``state`` paths only) ·
                               ``load_weights``; without a model id
                               (``create_training_client_from_state*``): a new model,
                               ``adapter.register_requested`` with ``init_from`` = that
                               ``uri``, ``init_optimizer`` = ``optimizer``, named by the
                               SDK's alias · ``create_from_state``
``unload_model``               ``adapter.deregister_requested`` (ingress) · ``unload_model``
=============================  ============================================================

Every route takes a model id or an alias (:mod:`orchestrator.gateway.records`): events carry the
model id, answers the id the client sent. Request ids are ``<model>.<seq_id>`` (the SDK numbers
every request of a training client; a model's creation is ``<model>.create``), so a retried
submission is recognised (:meth:`~orchestrator.gateway.futures_api.Futures.submit`).
"""

from __future__ import annotations

import re

import msgspec
import redis

from events.codec import DEFAULT_MAX_BYTES, encode, new_id
from events.effects import Effects
from events.futures import PathRecord, sampler_path
from events.schema import (
    DeregisterRequested,
    ForwardBackward,
    LoadWeights,
    OptimStep,
    RegisterRequested,
    SaveWeights,
)
from events.specs import AdapterSpec
from events.streams import Streams
from orchestrator.gateway import wire
from orchestrator.gateway.call import Call, Limits
from orchestrator.gateway.datums import loss_config, loss_fn_name, to_bus_datums
from orchestrator.gateway.errors import HttpError, bad_request
from orchestrator.gateway.futures_api import Futures
from orchestrator.gateway.protowire import ProtoError, read_forward_backward
from orchestrator.gateway.records import (
    ModelRecord,
    Records,
    SamplerRecord,
    alias_for,
    model_id_for,
)
from orchestrator.gateway.render import PROTOBUF, Echo, Reply, json_reply
from orchestrator.gateway.sessions import Sessions

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Checkpoint names (they become part of ``tinker://`` paths and storage directories)."""


class TrainingRoutes:
    """The training endpoints over one namespace (see the module doc)."""

    def __init__(
        self,
        streams: Streams,
        records: Records,
        sessions: Sessions,
        futures: Futures,
        limits: Limits,
    ) -> None:
        self.streams = streams
        self.records = records
        self.sessions = sessions
        self.futures = futures
        self.limits = limits

    def _accepted(self, request_id: str, model: str) -> Reply:
        return json_reply({"request_id": request_id, "model_id": model or None})

    def _request_id(self, model: str, seq_id: int | None) -> str:
        return f"{model}.{seq_id}" if seq_id is not None else f"{model}.{new_id()}"

    def create_model(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.CreateModel)
        lim = self.limits
        if body.base_model != lim.base_model:
            raise bad_request(
                "base_model", f"{body.base_model!r} is not served here; use {lim.base_model!r}"
            )
        lora = body.lora_config
        if lora is None:
            raise bad_request("lora_config", "full fine-tuning is not supported; give a LoRA rank")
        if not 1 <= lora.rank <= lim.max_rank:
            raise bad_request("lora_config.rank", f"{lora.rank}; use 1 <= rank <= {lim.max_rank}")
        if not (lora.train_mlp and lora.train_attn):
            raise bad_request(
                "lora_config", "every attention and MLP layer is trained; keep both train_ flags"
            )
        if body.optimizer_config.type != "adamw":
            raise bad_request("optimizer_config.type", f"{body.optimizer_config.type!r}; use adamw")
        self.sessions.require_active(call.tenant, body.session_id)
        model = model_id_for(call.tenant, body.session_id, body.model_seq_id)
        seed = lora.seed if lora.seed is not None else int(new_id()[:7], 16)
        spec = AdapterSpec(
            driver="client",
            base_model=lim.base_model,
            rank=lora.rank,
            alpha=lim.lora_alpha,
            steps=lim.max_steps,
            seed=seed,
        )
        request_id = self._register(call, body.session_id, model, spec, kind="create_model")
        return self._accepted(request_id, model)

    def _register(
        self,
        call: Call,
        session_id: str,
        model: str,
        spec: AdapterSpec,
        *,
        kind: str,
        alias: str = "",
        echo: Echo | None = None,
    ) -> str:
        """Submit the registration of the session's new model ``model`` (its record, its place
        in the session, its ``alias`` if the client names it by one, the event and the future,
        atomically; 410 if the session ended meanwhile); returns the request id."""
        event = RegisterRequested(adapter=model, registration_id=model, spec=spec)
        session_key = self.records.keys.session(session_id)
        effects = Effects().hset(
            self.records.keys.model(model),
            {
                "tenant": call.tenant,
                "session": session_id,
                "rank": spec.rank,
                "alpha": spec.alpha,
                "released": "0",
            },
        )
        effects.command("SADD", self.records.keys.session_models(session_id), model)
        if alias:
            effects.hset(self.records.keys.alias(alias), {"tenant": call.tenant, "model": model})

        def session_active(pipe: redis.client.Pipeline) -> None:
            if pipe.hget(session_key, "state") != b"active":
                raise HttpError(410, f"session {session_id!r} has ended", field="session_id")

        request_id = f"{model}.create"
        self.futures.submit(
            call.tenant,
            request_id,
            kind=kind,
            model=model,
            events=[(self.streams.ingress, event)],
            effects=effects,
            watch=[session_key],
            precheck=session_active,
            echo=echo,
        )
        return request_id

    def forward_backward(self, call: Call) -> Reply:
        content_type = call.headers.get("content-type", "")
        if PROTOBUF not in content_type:
            raise HttpError(415, f"forward_backward takes {PROTOBUF}, got {content_type!r}")
        if call.headers.get("content-encoding", "identity") != "identity":
            raise HttpError(415, "compressed bodies are not supported; send it uncompressed")
        try:
            request = read_forward_backward(call.body)
        except ProtoError as err:
            raise bad_request("body", f"not a ForwardBackwardRequest: {err}") from None
        model = self.records.model(call.tenant, request.model_id)
        loss_fn = loss_fn_name(request.loss_fn)
        request_id = self._request_id(model.model_id, request.seq_id or None)
        event = ForwardBackward(
            adapter=model.model_id,
            registration_id=model.model_id,
            request_id=request_id,
            datums=to_bus_datums(request.data, loss_fn),
            loss_fn=loss_fn,
            loss_config=loss_config(request.loss_fn_config),
            backward=not request.forward_only,
        )
        size = len(encode(event)["event"])
        if size > DEFAULT_MAX_BYTES:
            raise HttpError(
                413,
                f"these {len(event.datums)} datums make a {size}-byte event, over the bus's "
                f"{DEFAULT_MAX_BYTES}-byte limit; send fewer or shorter datums per call",
            )
        kind = "forward" if request.forward_only else "forward_backward"
        return self._submit_train(call, request_id, kind, model, event)

    def _submit_train(
        self, call: Call, request_id: str, kind: str, model: ModelRecord, event: msgspec.Struct
    ) -> Reply:
        self.futures.submit(
            call.tenant,
            request_id,
            kind=kind,
            model=model.model_id,
            events=[(self.streams.requests, event)],
            echo=_echo(model),
        )
        return self._accepted(request_id, model.client_id)

    def optim_step(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.OptimStep)
        model = self.records.model(call.tenant, body.model_id)
        adam = body.adam()
        for field in msgspec.structs.fields(adam):
            value = getattr(adam, field.name)
            if value != value or value in (float("inf"), float("-inf")):
                raise bad_request(f"adam_params.{field.name}", f"{value!r}; give a finite number")
        request_id = self._request_id(model.model_id, body.seq_id)
        event = OptimStep(
            adapter=model.model_id,
            registration_id=model.model_id,
            request_id=request_id,
            **msgspec.structs.asdict(adam),
        )
        return self._submit_train(call, request_id, "optim_step", model, event)

    def _name(self, name: str | None) -> str:
        if name is None or not NAME_PATTERN.match(name):
            raise bad_request(
                "path", f"{name!r}; name it with 1-128 letters, digits, '.', '_' or '-'"
            )
        return name

    def save_for_sampler(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.SaveWeights)
        model = self.records.model(call.tenant, body.model_id)
        if body.kind != "snapshot":
            raise bad_request("kind", f"{body.kind!r} is not supported; use 'snapshot'")
        request_id = self._request_id(model.model_id, body.seq_id)
        effects, echo = Effects(), _echo(model) or Echo()
        if body.path is None:  # save_weights_and_get_sampling_client: answer a sampling session
            seq = body.sampling_session_seq_id
            if seq is None:
                raise bad_request("path", "give a name, or a sampling_session_seq_id")
            name = f"session-{model.session}-{seq}"
            sampler = SamplerRecord(
                sampler_id=f"{model.session}-sampler-{seq}",
                tenant=call.tenant,
                base_model=self.limits.base_model,
                model_path=sampler_path(model.model_id, name),
                session=model.session,
            )
            sampler_key = self.records.keys.sampler(sampler.sampler_id)
            effects.hset(sampler_key, self.records.sampler_fields(sampler))
            echo = msgspec.structs.replace(echo, sampler=sampler.sampler_id)
        else:
            name = self._name(body.path)
        event = SaveWeights(
            adapter=model.model_id,
            registration_id=model.model_id,
            request_id=request_id,
            name=name,
            kind="sampler",
        )
        self.futures.submit(
            call.tenant,
            request_id,
            kind="save_weights_for_sampler",
            model=model.model_id,
            events=[(self.streams.requests, event)],
            effects=effects,
            echo=echo,
        )
        return self._accepted(request_id, model.client_id)

    def save_state(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.SaveWeights)
        model = self.records.model(call.tenant, body.model_id)
        request_id = self._request_id(model.model_id, body.seq_id)
        event = SaveWeights(
            adapter=model.model_id,
            registration_id=model.model_id,
            request_id=request_id,
            name=self._name(body.path),
            kind="state",
        )
        return self._submit_train(call, request_id, "save_weights", model, event)

    def _state_path(self, tenant: str, tinker_path: str) -> PathRecord:
        """The tenant's saved training state ``tinker_path`` (404 unless the tenant's, 400 for
        sampler weights)."""
        path = self.records.path(tenant, tinker_path, field="path")
        if path.kind != "state":
            raise bad_request(
                "path", f"{tinker_path!r} holds sampler weights; load a path from save_state"
            )
        return path

    def load_weights(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.LoadWeights)
        if body.weights_access_token is not None:
            raise bad_request(
                "weights_access_token", "loading another account's checkpoint is not supported"
            )
        config = body.optimizer_config
        if config is not None and config.type != "adamw":
            raise bad_request("optimizer_config.type", f"{config.type!r}; use adamw")
        if body.model_id is None:
            return self._create_from_state(call, body)
        if body.session_id is not None:
            raise bad_request(
                "session_id",
                "give model_id (load into that model) or session_id and model_seq_id (create "
                "a model from the checkpoint), not both",
            )
        model = self.records.model(call.tenant, body.model_id)
        path = self._state_path(call.tenant, body.path)
        request_id = self._request_id(model.model_id, body.seq_id)
        event = LoadWeights(
            adapter=model.model_id,
            registration_id=model.model_id,
            request_id=request_id,
            uri=path.uri,
            with_optimizer=body.optimizer,
        )
        return self._submit_train(call, request_id, "load_weights", model, event)

    def _create_from_state(self, call: Call, body: wire.LoadWeights) -> Reply:
        """``create_training_client_from_state[_with_optimizer]``: a new model of the session,
        registered with the checkpoint's weights (and, with ``optimizer``, its Adam state) in
        its slot, named by the SDK's alias (:func:`~orchestrator.gateway.records.alias_for`).

        The rank is that of the model that saved the checkpoint (its gateway record: a model's
        rank never changes), so the gateway never reads the checkpoint store; the trainer
        checks it against the checkpoint's training state and rejects a mismatch, which fails
        the future with the reason. The alpha is the saving model's too (the checkpoint's).
        """
        lim = self.limits
        if body.session_id is None or body.model_seq_id is None:
            raise bad_request(
                "model_id",
                "give model_id (load into that model) or session_id and model_seq_id (create "
                "a model from the checkpoint)",
            )
        if body.base_model is not None and body.base_model != lim.base_model:
            raise bad_request(
                "base_model", f"{body.base_model!r} is not served here; use {lim.base_model!r}"
            )
        if body.optimizer and body.optimizer_config is not None:
            raise bad_request(
                "optimizer_config", "the checkpoint's optimizer state is restored; leave it unset"
            )
        self.sessions.require_active(call.tenant, body.session_id)
        path = self._state_path(call.tenant, body.path)
        source = self.records.model(call.tenant, path.model, live=False)
        model = model_id_for(call.tenant, body.session_id, body.model_seq_id)
        alias = alias_for(body.session_id, body.model_seq_id)
        spec = AdapterSpec(
            driver="client",
            base_model=lim.base_model,
            rank=source.rank,
            alpha=source.alpha,
            steps=lim.max_steps,
            init_from=path.uri,
            init_optimizer=body.optimizer,
        )
        echo = Echo(client_model=alias, load_path=body.path)
        request_id = self._register(
            call, body.session_id, model, spec, kind="create_from_state", alias=alias, echo=echo
        )
        return self._accepted(request_id, alias)

    def unload_model(self, call: Call) -> Reply:
        body = wire.decode(call.body, wire.ModelRef)
        model = self.records.model(call.tenant, body.model_id, live=False)
        event = DeregisterRequested(
            adapter=model.model_id, registration_id=model.model_id, reason="unload_model"
        )
        model_key = self.records.keys.model(model.model_id)
        effects = Effects().command("HSET", model_key, "released", "1")
        request_id = f"{model.model_id}.unload"
        self.futures.submit(
            call.tenant,
            request_id,
            kind="unload_model",
            model=model.model_id,
            events=[(self.streams.ingress, event)],
            effects=effects,
            echo=_echo(model),
        )
        return self._accepted(request_id, model.client_id)


def _echo(model: ModelRecord) -> Echo | None:
    """What a response about ``model`` repeats: the client's id of it, when it is an alias."""
    return Echo(client_model=model.client_id) if model.client_id != model.model_id else None
