"""
The admin API on C{--admin-listen}: C{POST /admin/COMMAND} with the
command's arguments as a JSON object, e.g. C{POST /admin/delete-crew
{"crew_code": "LEELOO-7X3K"}}, behind C{Authorization: Bearer TOKEN} (the
token in C{DATA_DIR/admin.token}), for loopback clients only.  Each
command is the relay core's L{leeloo.core.operator.Operator}, so the cache
and the store change together.

Answers: 200 C{{"ok": true, ...}} with what was done; 400 C{invalid_argument}
(bad input); 401 C{unauthorized} (no or a wrong token); 403 C{forbidden}
(not from this host); 404 C{unknown_command}; 405; 409 C{refused} (the
relay will not do it as things are); 503 C{store_unavailable} (the store
failed to write it).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from leeloo import messages
from leeloo.admin.state import StateError, read_export
from leeloo.core.operator import Imported, Operator, Refused
from leeloo.store import StoreError
from leeloo.web import APIError, client_address, from_this_host, write_json


def _string(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, "invalid_argument", f"{name} required (a string)")
    if len(value) > messages.MAX_FIELD_LENGTH:
        raise APIError(400, "invalid_argument", f"{name} is too long")
    return value.strip()


class AdminAPI(Resource):
    """
    C{/admin/...}.

    @param read_import: the state in an export file (L{read_export}).
    """

    isLeaf = True
    log = Logger()

    def __init__(self, operator: Operator, token: str,
                 read_import: Callable[[str], Imported] = read_export) -> None:
        super().__init__()
        self.operator = operator
        self._expected = b"Bearer " + token.encode("ascii")
        self._read_import = read_import
        self.commands: dict[bytes, Callable[[dict], Any]] = {
            b"reset-key": lambda b: operator.reset_key(_string(b, "device_id")),
            b"remove": lambda b: operator.remove(_string(b, "device_id"), _string(b, "crew_code")),
            b"rename-crew": lambda b: operator.rename_crew(_string(b, "crew_code"), _string(b, "new_crew_code")),
            b"delete-crew": lambda b: operator.delete_crew(_string(b, "crew_code")),
            b"import": self._import,
        }

    def render(self, request: Request) -> Any:
        # notifyFinish fails once the client has gone.
        gone: list = []
        request.notifyFinish().addErrback(gone.append)
        d = maybeDeferred(self._dispatch, request)
        d.addCallbacks(lambda answer: (200, {"ok": True, **answer}), self._error, errbackArgs=(request,))
        d.addCallback(self._answer, request, gone)
        d.addErrback(self.log.failure, "bug while answering an admin API call")
        return NOT_DONE_YET

    def _dispatch(self, request: Request) -> Any:
        if not from_this_host(request):
            self.log.warn("admin API call from {client_address} refused: not from this host",
                          client_address=client_address(request))
            raise APIError(403, "forbidden", "the admin API answers clients on this host only")
        given = request.getHeader(b"authorization") or b""
        if not hmac.compare_digest(given, self._expected):
            self.log.warn("admin API call with a wrong or missing token from {client_address}",
                          client_address=client_address(request))
            raise APIError(401, "unauthorized", "send Authorization: Bearer <the token in DATA_DIR/admin.token>")
        command = b"/".join(request.postpath)
        call = self.commands.get(command)
        if call is None:
            raise APIError(404, "unknown_command",
                           "commands: " + ", ".join(c.decode() for c in sorted(self.commands)))
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            raise APIError(405, "method_not_allowed", "use POST")
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            raise APIError(400, "invalid_argument", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "invalid_argument", "the body must be a JSON object")
        self.log.info("admin API: {command}", command=command.decode("ascii", "replace"))
        return call(body)

    def _import(self, body: dict) -> Any:
        path = _string(body, "file")
        try:
            state = self._read_import(path)
        except StateError as e:
            raise APIError(400, "invalid_argument", f"{path}: {e}") from None
        return self.operator.import_state(state)

    def _error(self, failure: Any, request: Request) -> tuple[int, dict]:
        if failure.check(APIError):
            return failure.value.status, failure.value.body()
        if failure.check(Refused):
            return 409, {"error": "refused", "message": str(failure.value)}
        if failure.check(messages.ProtocolError):
            return 400, {"error": "invalid_argument", "message": failure.value.message}
        if failure.check(StoreError):
            self.log.error("admin API: the store failed: {error}", error=failure.getErrorMessage())
            return 503, {"error": "store_unavailable",
                         "message": f"the store failed ({failure.getErrorMessage()}); the relay retries what "
                                    "it holds, so check again with the reading commands"}
        self.log.failure("bug in an admin API call", failure)
        return 500, {"error": "internal_error"}

    @staticmethod
    def _answer(answer: tuple[int, dict], request: Request, gone: list) -> None:
        if gone or request.finished:
            return
        request.write(write_json(request, *answer))
        request.finish()
