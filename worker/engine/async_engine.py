"""AsyncLLMEngine: the step loop on a background thread, one async iterator per request.

Requests are validated on the caller's thread (errors raise immediately), then handed to the
loop thread through a queue; only that thread touches the engine. Outputs travel back with
`call_soon_threadsafe`. A consumer slower than the engine never blocks it: undelivered outputs
of a request are coalesced into one, so memory stays bounded by the text itself
(back-pressure without stalling other requests). A consumer that goes away aborts its request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from worker.engine.llm_engine import LLMEngine, RequestOutput
from worker.engine.sequence import Sequence
from worker.errors import EngineDeadError, RequestNotFoundError
from worker.wire import MultimodalInput, SamplingParams

logger = logging.getLogger(__name__)


class _RequestStream:
    """Outputs of one request (of each of its n samples), waiting to be read on the
    consumer's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, num_samples: int):
        self.loop = loop
        self.num_unfinished = num_samples  # counted on the engine's loop thread
        self.pending: dict[int, RequestOutput] = {}  # by sample index, in arrival order
        self.error: BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:  # on the consumer's loop
        earlier = self.pending.get(output.index)
        self.pending[output.index] = output if earlier is None else earlier.merge(output)
        self.ready.set()

    def fail(self, error: BaseException) -> None:  # on the consumer's loop
        self.error = error
        self.ready.set()

    async def get(self) -> RequestOutput:
        await self.ready.wait()
        if not self.pending:
            raise self.error
        output = self.pending.pop(next(iter(self.pending)))
        if not self.pending and self.error is None:  # an error stays ready for the next get
            self.ready.clear()
        return output


@dataclass
class _Add:
    seq: Sequence
    stream: _RequestStream


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _RequestStream] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._dead: BaseException | None = None
        self._step_started: float | None = None  # monotonic time the running step began
        self._thread = threading.Thread(target=self._loop, name="msa-engine-loop", daemon=True)
        self._thread.start()

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None,
                       mm_inputs: tuple[MultimodalInput, ...] = ()
                       ) -> AsyncIterator[RequestOutput]:
        """Streams a request's outputs (its n samples' interleaved, told apart by `index`);
        raises InvalidRequestError & co. before the first one."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        seq = self.engine.make_sequence(prompt, params, request_id, mm_inputs)
        stream = _RequestStream(asyncio.get_running_loop(), params.n)
        self._send(_Add(seq, stream))
        unfinished = params.n
        try:
            while unfinished:
                output = await stream.get()
                unfinished -= output.finished
                yield output
        finally:
            if unfinished:  # the consumer left (cancelled, disconnected, or broke out)
                self._send(_Abort(seq.request_id))

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs fn(engine) on the loop thread between steps (the engine is not thread-safe)."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        future = asyncio.get_running_loop().create_future()
        self._send(_Call(fn, future))
        return await future

    def check_alive(self, stuck_step_s: float) -> None:
        """Liveness without waiting for the step in progress: raises EngineDeadError when the
        loop has died, or when one step has run for longer than stuck_step_s (a hung device)."""
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        started = self._step_started
        if started is not None and time.monotonic() - started > stuck_step_s:
            raise EngineDeadError(f"one engine step has run for {time.monotonic() - started:.0f} s "
                                  f"(limit {stuck_step_s:g} s)")
        if self.engine.peers is not None:
            self.engine.peers.check_alive()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=30)
        self.engine.close()

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- the loop thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if not self.engine.has_unfinished_requests:
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                self._step_started = time.monotonic()
                outputs = self.engine.step()
                self._step_started = None
                for output in outputs:
                    self._deliver(output)
        except BaseException as exc:  # surface the failure to every waiting request
            logger.exception("engine loop failed")
            self._dead = exc
            error = EngineDeadError(f"the engine loop failed: {exc!r}")
            for request_id in list(self._streams):
                stream = self._streams.pop(request_id)
                stream.loop.call_soon_threadsafe(stream.fail, error)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Call):
                self._run_call(command)
            elif isinstance(command, _Add):
                try:
                    self.engine.add_sequence(command.seq)
                except Exception as exc:
                    command.stream.loop.call_soon_threadsafe(command.stream.fail, exc)
                    continue
                self._streams[command.seq.request_id] = command.stream
            else:
                try:
                    self.engine.abort(command.request_id)
                except RequestNotFoundError:
                    pass  # finished on its own meanwhile
                self._streams.pop(command.request_id, None)

    def _run_call(self, call: _Call) -> None:
        loop = call.future.get_loop()
        try:
            result = call.fn(self.engine)
        except Exception as exc:
            loop.call_soon_threadsafe(_settle, call.future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, call.future, result, None)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        stream.num_unfinished -= output.finished
        if output.error is not None:
            # One failed sample fails the request: its other samples stop too.
            del self._streams[output.request_id]
            if output.request_id in self.engine.requests:
                self.engine.abort(output.request_id)
            stream.loop.call_soon_threadsafe(stream.fail, output.error)
            return
        if stream.num_unfinished == 0:
            del self._streams[output.request_id]
        stream.loop.call_soon_threadsafe(stream.put, output)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
