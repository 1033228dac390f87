"""The gRPC server: DenseService plus the standard health service (follows readiness) and reflection,
API-key auth, message size limits and keepalive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.config import Settings
from service.grpc.descriptors import reflection_pool
from service.grpc.servicer import DenseServicer
from service.grpc.stubs import dense_pb2, dense_pb2_grpc
from service.keys import ApiKeys, checks_keys, presented_key
from service.ports import PortTaken, check_free
from service.queue.base import Broker
from service.readiness import readiness

if TYPE_CHECKING:
    from service.worker.worker import Worker

log = logging.getLogger(__name__)
SERVICE = dense_pb2.DESCRIPTOR.services_by_name["DenseService"].full_name
EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer KEY` or `x-api-key: KEY` metadata, checked against the one key source REST uses
    (service/keys.py); health and reflection stay open."""

    def __init__(self, keys: ApiKeys | Sequence[str]) -> None:
        self.keys = keys if isinstance(keys, ApiKeys) else ApiKeys(keys)

    def _valid(self, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
        md = {k.lower(): v for k, v in metadata if isinstance(v, str)}
        return self.keys.valid(presented_key(md))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(EXEMPT) or self._valid(details.invocation_metadata or ()):
            return handler
        message = "an API key is required: metadata `authorization: Bearer KEY` or `x-api-key: KEY`"

        async def deny(_request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler is None:
            return handler
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class GrpcFrontend:
    """Runs beside the REST app (a lifespan sidecar) or alone (`dense-serve grpc`)."""

    def __init__(self, settings: Settings, host: str | None = None, port: int | None = None) -> None:
        self.settings = settings
        self.address = f"{host or settings.grpc_host or settings.host}:{settings.grpc_port if port is None else port}"
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.health = health.aio.HealthServicer()
        self._watch: asyncio.Task[None] | None = None

    def bind(self) -> int:
        """Create the server and bind its port, in the running event loop, before anything says where it
        listens; idempotent. A port another process holds is refused (PortTaken, one line for the CLI): the
        port is checked first and bound without SO_REUSEPORT, so two servers never share it and split calls."""
        if self.server is not None:
            return self.port
        s = self.settings
        host, _, port = self.address.rpartition(":")
        check_free("gRPC", host, int(port), "--grpc-port")
        options = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", s.max_upload_bytes + 1024 * 1024),
            ("grpc.max_send_message_length", 512 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        keys = ApiKeys.of(s)
        server = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(keys)] if checks_keys(s, keys) else [],
            options=options,
            maximum_concurrent_rpcs=s.grpc_max_concurrent_rpcs,  # beyond it: RESOURCE_EXHAUSTED, not a pile-up
        )
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError:  # grpcio >= 1.5x raises where older ones returned 0
            self.port = 0
        if self.port == 0:
            raise PortTaken(f"gRPC port {port} on {host} cannot be bound (in use?); choose another with --grpc-port")
        self.server = server
        return self.port

    @property
    def bound_address(self) -> str:
        """host:port as bound (the port chosen by the system when 0 was asked)."""
        return f"{self.address.rpartition(':')[0]}:{self.port}"

    async def start(self, broker: Broker, worker: Worker | None, expected: Sequence[str]) -> None:
        self.bind()
        assert self.server is not None
        dense_pb2_grpc.add_DenseServiceServicer_to_server(DenseServicer(broker, self.settings, expected), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # The pool serves dense.proto with its comments (source info), which the runtime's own pool drops.
        names = [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server, pool=reflection_pool())
        await self.server.start()
        await self._set(False)
        self._watch = asyncio.create_task(self._follow_readiness(broker, worker, expected))
        log.info("gRPC on %s", self.bound_address)

    async def _set(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def _follow_readiness(self, broker: Broker, worker: Worker | None, expected: Sequence[str]) -> None:
        last: bool | None = None
        while True:
            ready = (await readiness(broker, worker, expected, self.settings.scale_from_zero)).ready
            if ready != last:
                await self._set(ready)
                last = ready
            await asyncio.sleep(0.25)

    async def stop(self, grace_s: float | None = None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(self.settings.shutdown_grace_s if grace_s is None else grace_s)
