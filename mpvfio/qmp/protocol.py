"""The QMP server: sockets, sessions, negotiation, dispatch, events (layer 5).

What a conforming server must do for real clients (``qemu.qmp``,
``qmp-shell``, ``qmp-tui``; ../shared/spec/QMP.md §9) and how it is done here:

* **Sockets.** :func:`qmp_listen` binds ``unix:PATH`` (mode 0600; refuses to
  start over a *live* socket, found by a probe connect, and removes a stale
  one) or ``tcp:HOST:PORT`` (IPv6 in brackets).  It reuses
  :func:`mpvfio.net.transport.listen`, which implements exactly these
  rules for migration sockets.  Every connection is its own session.
* **Greeting** at once: ``{"QMP": {"version": V, "capabilities": []}}`` with
  a full ``qemu`` major/minor/micro triple.  ``oob`` is not offered (it is
  not implemented; qemu.qmp would enable it automatically).
* **Negotiation.**  Until ``qmp_capabilities`` succeeds every other command
  gets ``CommandNotFound`` / ``Expecting capabilities negotiation with
  'qmp_capabilities'`` and no events are sent to the session (they are
  dropped for it, not queued).  Its reply is exactly ``{"return": {}}``; a
  second one gets ``CommandNotFound`` / ``Capabilities negotiation is
  already complete, command ignored``.
* **Framing.**  Input is a JSON stream (:mod:`mpvfio.qmp.message`); output
  is one compact object per line, CRLF-terminated.
* **Requests** are checked like QEMU's ``qmp_dispatch_check_obj``: the
  exact QEMU error strings, ``GenericError``; the ``id`` is echoed as the
  same JSON value whenever the request had one (an error for input that was
  not a JSON object, or could not be parsed, has none).  Arguments are
  type-checked against the command's schema before the command runs
  (``Parameter 'x' is missing`` / ``is unexpected`` / ``Invalid parameter
  type for 'x', expected: string``).
* **Order.**  A session's requests run one at a time, in order; its input is
  not read while a command runs (QEMU without OOB does the same), so its
  replies come back in request order.  Sessions run concurrently.
* **Robustness.**  Malformed input, oversize messages, unknown commands,
  bad arguments and failing commands produce error replies and the session
  goes on; a client that disconnects in the middle of a command does not
  cancel the command (it runs to its end, the reply is dropped); a client
  that stops reading events is disconnected once its output backlog passes
  ``max_output`` bytes, and the other clients are not affected.
* **Events** (:meth:`QMPServer.emit`) go to every negotiated session;
  :meth:`QMPServer.emit_threadsafe` hands an event over from any thread
  with ``loop.call_soon_threadsafe``, so it is written as soon as the loop
  runs, not batched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mpvfio.errors import MpvfioError, UsageError
from mpvfio.ipc.inherit import parent_only
from mpvfio.net.transport import Listener, TransportError, listen, parse_uri
from mpvfio.qmp.message import MAX_MESSAGE_SIZE, JSONStreamParser, Malformed, encode

__all__ = [
    "COMMAND_NOT_FOUND",
    "GENERIC_ERROR",
    "Arg",
    "Command",
    "Enum",
    "ListOf",
    "QMPError",
    "QMPServer",
    "Struct",
    "check_arguments",
    "qmp_check_address",
    "qmp_listen",
]

_log = logging.getLogger(__name__)

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"

NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED_DESC = (
    "Capabilities negotiation is already complete, command ignored"
)

#: Bytes a session may have queued for writing before it is dropped.
MAX_OUTPUT = 16 << 20
#: Bytes asked of the socket per read.
READ_SIZE = 64 << 10


class QMPError(Exception):
    """An error reply: ``{"error": {"class": error_class, "desc": desc}}``."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


# ------------------------------------------------------------ arguments
@dataclass(frozen=True)
class ListOf:
    """A QAPI array of ``item``."""

    item: TypeSpec


@dataclass(frozen=True)
class Enum:
    """A QAPI enum (a string from ``values``)."""

    values: tuple[str, ...]


@dataclass(frozen=True)
class Arg:
    """One member of a command's arguments (or of a :class:`Struct`).

    :param name: the member name.
    :param type: ``"str"``, ``"int"``, ``"bool"``, ``"number"``, ``"any"``,
        or a :class:`ListOf`, :class:`Enum` or :class:`Struct`.
    :param optional: whether it may be left out.
    """

    name: str
    type: TypeSpec
    optional: bool = False


@dataclass(frozen=True)
class Struct:
    """A QAPI struct: an object with these members and no others."""

    members: tuple[Arg, ...]


TypeSpec = str | ListOf | Enum | Struct

_EXPECTED = {
    "str": "string",
    "int": "integer",
    "bool": "boolean",
    "number": "number",
}


def _check(value: Any, spec: TypeSpec, where: str) -> None:
    if isinstance(spec, str):
        if spec == "any":
            return
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
        }[spec]
        if not ok:
            raise QMPError(
                f"Invalid parameter type for '{where}', expected: {_EXPECTED[spec]}"
            )
    elif isinstance(spec, Enum):
        if not isinstance(value, str):
            raise QMPError(f"Invalid parameter type for '{where}', expected: string")
        if value not in spec.values:
            raise QMPError(f"Parameter '{where}' does not accept value '{value}'")
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise QMPError(f"Invalid parameter type for '{where}', expected: array")
        for i, item in enumerate(value):
            _check(item, spec.item, f"{where}[{i}]")
    else:
        if not isinstance(value, dict):
            raise QMPError(f"Invalid parameter type for '{where}', expected: object")
        _check_members(value, spec.members, f"{where}.")


def _check_members(
    args: Mapping[str, Any], members: tuple[Arg, ...], prefix: str
) -> None:
    for arg in members:
        if arg.name not in args:
            if not arg.optional:
                raise QMPError(f"Parameter '{prefix}{arg.name}' is missing")
            continue
        _check(args[arg.name], arg.type, f"{prefix}{arg.name}")
    known = {a.name for a in members}
    for key in args:
        if key not in known:
            raise QMPError(f"Parameter '{prefix}{key}' is unexpected")


def check_arguments(args: Mapping[str, Any], members: tuple[Arg, ...]) -> None:
    """Type-check a command's arguments as QEMU's input visitor does.

    :raises QMPError: ``GenericError`` naming the first bad member.
    """
    _check_members(args, members, "")


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    """One QMP command: its name, argument schema and async handler.

    The handler gets the checked arguments and returns the ``return`` value
    (``None`` means ``{}``); it raises :class:`QMPError` for an error reply.
    Any :class:`~mpvfio.errors.MpvfioError` becomes a ``GenericError`` with
    its message; anything else is logged and reported as an internal error.
    """

    name: str
    handler: Handler
    args: tuple[Arg, ...] = ()
    doc: str = ""


# ---------------------------------------------------------------- sockets
def qmp_listen(address: str) -> Listener:
    """Bind a QMP address: ``unix:PATH`` or ``tcp:HOST:PORT``.

    unix: the socket file gets mode 0600; a live server on the path (a
    probe connect succeeds) makes this fail, a stale socket file is
    removed, any other file is left alone and makes this fail.

    :raises UsageError: a malformed address.
    :raises TransportError: the address cannot be bound (naming why).
    """
    parse_uri(address)  # UsageError for a bad one, before anything is bound
    return listen(address)


def qmp_check_address(address: str) -> None:
    """Refuse early, without binding: a malformed address, or a unix path
    where a live server listens or that is not a socket.

    :func:`qmp_listen` checks again when it binds; this lets ``mpvfio run``
    fail before it starts any worker.
    """
    uri = parse_uri(address)
    if uri.kind != "unix":
        return
    try:
        st = os.lstat(uri.path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TransportError(f"cannot inspect socket path: {exc}", address) from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(
            "path exists and is not a socket; refusing to remove it",
            address,
            errno.EEXIST,
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(uri.path)
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: qmp_listen removes it
    except OSError:
        pass  # backlog full, timeout, EACCES: assume alive
    finally:
        probe.close()
    raise TransportError(
        "a live socket is listening on this path; refusing to replace it",
        address,
        errno.EADDRINUSE,
    )


# --------------------------------------------------------------- sessions
@dataclass(eq=False)
class _Session:
    sid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str
    negotiated: bool = False
    closed: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class QMPServer:
    """Serves QMP on one or more listeners (module docstring).

    :param commands: the command-mode command table (``qmp_capabilities`` is
        the protocol's own and must not be in it).
    :param version: the greeting's and ``query-version``'s VersionInfo.
    :param max_message_size: longest input message, bytes.
    :param max_output: output backlog that gets a non-reading client dropped.
    """

    def __init__(
        self,
        commands: Mapping[str, Command],
        version: dict[str, Any],
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_output: int = MAX_OUTPUT,
    ) -> None:
        if "qmp_capabilities" in commands:
            raise UsageError("qmp_capabilities belongs to the protocol")
        self.commands = dict(commands)
        self.version = version
        self.max_message_size = max_message_size
        self.max_output = max_output
        self._sessions: dict[int, _Session] = {}
        self._ids = itertools.count(1)
        self._servers: list[tuple[asyncio.Server, Listener]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # ------------------------------------------------------------ serving
    @property
    def command_names(self) -> list[str]:
        """Every command-mode command (``query-commands``)."""
        return ["qmp_capabilities", *self.commands]

    @property
    def sessions(self) -> int:
        """Open sessions."""
        return len(self._sessions)

    @property
    def negotiated_sessions(self) -> int:
        """Sessions in command mode (they receive events)."""
        return sum(1 for s in self._sessions.values() if s.negotiated)

    @property
    def addresses(self) -> list[str]:
        """The addresses served (a tcp port 0 resolved to the real port)."""
        return [str(lst.uri) for _, lst in self._servers]

    async def serve(self, listener: Listener) -> None:
        """Start accepting sessions on ``listener`` (this server closes it)."""
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=os.dup(listener.fileno()))
        parent_only(sock)
        try:
            server = await asyncio.start_server(
                self._client_connected, sock=sock, limit=READ_SIZE
            )
        except BaseException:
            sock.close()
            listener.close()
            raise
        self._servers.append((server, listener))
        _log.info("QMP listening on %s", listener.uri)

    def greeting(self) -> dict[str, Any]:
        """The greeting every session gets first."""
        return {"QMP": {"version": self.version, "capabilities": []}}

    async def _client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._closing:
            writer.close()
            return
        peer = writer.get_extra_info("peername") or "unix"
        conn = writer.get_extra_info("socket")
        if conn is not None:  # a worker forked later must not keep it open
            parent_only(conn)
        s = _Session(next(self._ids), reader, writer, str(peer))
        s.task = asyncio.current_task()
        self._sessions[s.sid] = s
        _log.info("QMP session %d opened (%s)", s.sid, s.peer)
        try:
            await self._session(s)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            _log.info("QMP session %d: connection lost: %s", s.sid, exc)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one session's bug never kills the server
            _log.exception("QMP session %d failed", s.sid)
        finally:
            self._sessions.pop(s.sid, None)
            s.closed = True
            with contextlib.suppress(Exception):
                writer.close()
            _log.info("QMP session %d closed", s.sid)

    async def _session(self, s: _Session) -> None:
        self._send(s, self.greeting())
        parser = JSONStreamParser(self.max_message_size)
        while not s.closed:
            data = await s.reader.read(READ_SIZE)
            if not data:
                return
            for item in parser.feed(data):
                reply = await self._request(s, item)
                self._send(s, reply)
                if s.closed:
                    return
            await self._drain(s)

    def _send(self, s: _Session, msg: dict[str, Any] | bytes) -> None:
        """Write one message, or its bytes from :func:`encode`; drop the
        session if its backlog is too large."""
        if s.closed or s.writer.is_closing():
            return
        try:
            s.writer.write(msg if isinstance(msg, bytes) else encode(msg))
        except (ConnectionError, OSError, RuntimeError):
            s.closed = True
            return
        transport = s.writer.transport
        if transport.get_write_buffer_size() > self.max_output:
            _log.warning(
                "QMP session %d does not read its output (%d bytes queued); "
                "disconnecting it",
                s.sid,
                transport.get_write_buffer_size(),
            )
            s.closed = True
            transport.abort()

    async def _drain(self, s: _Session) -> None:
        if s.closed or s.writer.is_closing():
            return
        with contextlib.suppress(ConnectionError, OSError):
            await s.writer.drain()

    # ----------------------------------------------------------- requests
    async def _request(self, s: _Session, item: Any) -> dict[str, Any]:
        """One parsed input item -> its reply (never raises)."""
        if isinstance(item, Malformed):
            return _error(GENERIC_ERROR, item.desc)
        req = item.value
        if not isinstance(req, dict):
            return _error(GENERIC_ERROR, "QMP input must be a JSON object")
        has_id = "id" in req
        rid = req.get("id")
        try:
            name, args = _check_request(req)
            value = await self._dispatch(s, name, args)
        except QMPError as exc:
            return _error(exc.error_class, exc.desc, has_id, rid)
        reply: dict[str, Any] = {"return": {} if value is None else value}
        if has_id:
            reply["id"] = rid
        return reply

    async def _dispatch(self, s: _Session, name: str, args: dict[str, Any]) -> Any:
        if name == "qmp_capabilities":
            check_arguments(args, (Arg("enable", ListOf(Enum(("oob",))), True),))
            if s.negotiated:
                raise QMPError(ALREADY_NEGOTIATED_DESC, COMMAND_NOT_FOUND)
            for cap in args.get("enable", []):
                raise QMPError(f"Capability '{cap}' not available")
            s.negotiated = True
            _log.info("QMP session %d negotiated", s.sid)
            return {}
        if not s.negotiated:
            raise QMPError(NEGOTIATION_DESC, COMMAND_NOT_FOUND)
        cmd = self.commands.get(name)
        if cmd is None:
            raise QMPError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        check_arguments(args, cmd.args)
        try:
            return await cmd.handler(args)
        except QMPError:
            raise
        except MpvfioError as exc:
            raise QMPError(str(exc)) from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.exception("QMP command %s failed", name)
            raise QMPError(f"internal error in {name}: {exc!r}") from exc

    # ------------------------------------------------------------- events
    def emit(self, message: dict[str, Any]) -> int:
        """Send an event message to every negotiated session (loop thread).

        :returns: how many sessions it was written to.
        """
        n = 0
        data = encode(message)  # once, not once per session
        for s in list(self._sessions.values()):
            if s.negotiated and not s.closed:
                self._send(s, data)
                n += 1
        return n

    def emit_threadsafe(self, message: dict[str, Any]) -> None:
        """Hand an event to the loop from any thread; sent as soon as it runs."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._closing:
            return
        try:
            loop.call_soon_threadsafe(self.emit, message)
        except RuntimeError:  # the loop closed meanwhile
            pass

    # -------------------------------------------------------------- close
    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop accepting, flush and close every session, close the listeners.

        A session in the middle of a command is cancelled (the command's
        worker thread, if any, runs to its end on its own).
        """
        self._closing = True
        for server, _ in self._servers:
            server.close()
        sessions = list(self._sessions.values())

        async def flush_and_close(s: _Session) -> None:
            if not s.closed and not s.writer.is_closing():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(s.writer.drain(), timeout)
            s.closed = True
            with contextlib.suppress(Exception):
                s.writer.close()

        await asyncio.gather(*(flush_and_close(s) for s in sessions))
        for s in sessions:
            if s.task is not None and not s.task.done():
                s.task.cancel()
        tasks = [s.task for s in sessions if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for server, listener in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout)
            listener.close()
        self._servers.clear()


def _check_request(req: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """QEMU's ``qmp_dispatch_check_obj`` (exact strings); exec-oob is not
    offered, so it is an unexpected member."""
    for key, value in req.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QMPError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "execute" not in req:
        raise QMPError("QMP input lacks member 'execute'")
    return req["execute"], dict(req.get("arguments", {}))


def _error(
    error_class: str, desc: str, has_id: bool = False, rid: Any = None
) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        reply["id"] = rid
    return reply
