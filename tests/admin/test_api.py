"""
L{leeloo.admin.api}: the admin API answers loopback clients with the
right token only, and runs each command through the relay's core.
"""

import json
from io import BytesIO

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from leeloo.admin.api import AdminAPI
from leeloo.admin.state import StateError
from leeloo.relay import Relay
from leeloo.store import MemoryStore
from leeloo.testing import Device, FailingMemoryStore

TOKEN = "t" * 43


def call(api, command, body=None, token=TOKEN, peer=IPv4Address("TCP", "127.0.0.1", 50000), method=b"POST",
         headers=(), clock=None):
    """
    C{api}'s answer to C{METHOD /admin/COMMAND} from C{peer}: (status, body)
    (C{clock} advanced a second first, when given).
    """
    request = DummyRequest([command.encode()])
    request.method = method
    request.client = peer
    request.content = BytesIO(b"" if body is None else json.dumps(body).encode())
    if token is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    for name, value in headers:
        request.requestHeaders.setRawHeaders(name, [value])
    api.render(request)
    if clock is not None:
        clock.advance(1)
    assert request.finished, "the admin API did not answer"
    return request.responseCode or 200, json.loads(b"".join(request.written))


class AdminAPITests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = MemoryStore()
        self.relay = Relay(self.clock, self.store)
        self.api = AdminAPI(self.relay.operator, TOKEN)
        self.device = Device(self.relay)
        self.device.send(type="create_crew", device_id="leeloo_a", crew_code="LEELOO-ALFA", display_name="A")

    def test_missing_token(self):
        """
        A call without a token is 401, and changes nothing.
        """
        self.assertEqual(call(self.api, "delete-crew", {"crew_code": "LEELOO-ALFA"}, token=None)[0], 401)
        self.assertIn("LEELOO-ALFA", self.relay.crews)

    def test_wrong_token(self):
        """
        A call with another token (a prefix of the right one too) is 401.
        """
        for wrong in ("x" * 43, TOKEN[:-1], TOKEN + "t", ""):
            status, body = call(self.api, "delete-crew", {"crew_code": "LEELOO-ALFA"}, token=wrong)
            self.assertEqual((status, body["error"]), (401, "unauthorized"))
        self.assertIn("LEELOO-ALFA", self.relay.crews)

    def test_not_loopback(self):
        """
        A call from an address that is not loopback is 403, even with the
        right token; so is one a proxy on this host forwarded.
        """
        for peer in (IPv4Address("TCP", "192.0.2.7", 50000), IPv6Address("TCP", "2001:db8::7", 50000)):
            status, body = call(self.api, "delete-crew", {"crew_code": "LEELOO-ALFA"}, peer=peer)
            self.assertEqual((status, body["error"]), (403, "forbidden"))
        forwarded = call(self.api, "delete-crew", {"crew_code": "LEELOO-ALFA"},
                         headers=[(b"x-forwarded-for", b"192.0.2.7")])
        self.assertEqual(forwarded[0], 403)
        self.assertIn("LEELOO-ALFA", self.relay.crews)

    def test_ipv6_loopback(self):
        """
        ::1 is loopback too.
        """
        status, body = call(self.api, "delete-crew", {"crew_code": "LEELOO-ALFA"},
                            peer=IPv6Address("TCP", "::1", 50000))
        self.assertEqual((status, body["ok"]), (200, True))

    def test_command_runs_in_the_core(self):
        """
        A command is done by the relay's core: the crew goes from the cache
        and the store, and its member online is told.
        """
        self.device.take()
        status, body = call(self.api, "delete-crew", {"crew_code": "leeloo-alfa"})
        self.assertEqual((status, body), (200, {"ok": True, "crew_code": "LEELOO-ALFA", "online": 1, "closed": 1}))
        self.assertEqual((self.relay.crews, self.store.crews), ({}, {}))
        self.assertEqual(self.device.take(), [{"type": "crew_deleted", "crew_code": "LEELOO-ALFA"}])

    def test_refusal(self):
        """
        What the relay will not do is 409 refused, with why.
        """
        status, body = call(self.api, "rename-crew", {"crew_code": "LEELOO-NONE", "new_crew_code": "LEELOO-BBBB"})
        self.assertEqual((status, body), (409, {"error": "refused", "message": "no crew LEELOO-NONE"}))

    def test_bad_input(self):
        """
        A missing argument, a body that is not a JSON object, or a code
        that cannot be one is 400 invalid_argument.
        """
        self.assertEqual(call(self.api, "remove", {"device_id": "leeloo_a"})[1],
                         {"error": "invalid_argument", "message": "crew_code required (a string)"})
        self.assertEqual(call(self.api, "remove", ["leeloo_a"])[0], 400)
        status, body = call(self.api, "delete-crew", {"crew_code": "A" * 65})
        self.assertEqual((status, body["error"]), (400, "invalid_argument"))

    def test_unknown_command_and_method(self):
        """
        An unknown command is 404; a command by GET, 405.
        """
        self.assertEqual(call(self.api, "frobnicate", {})[0], 404)
        self.assertEqual(call(self.api, "delete-crew", method=b"GET")[0], 405)

    def test_import_reads_the_file(self):
        """
        import reads the file the call names, through the injected reader;
        a file it cannot read is 400, and the relay is unchanged.
        """
        def unreadable(path):
            raise StateError("not JSON")

        api = AdminAPI(self.relay.operator, TOKEN, read_import=unreadable)
        status, body = call(api, "import", {"file": "/tmp/nothing.json"})
        self.assertEqual((status, body["message"]), (400, "/tmp/nothing.json: not JSON"))

    def test_store_failure(self):
        """
        A change the store fails to write is 503 store_unavailable, not a
        bug.
        """
        store = FailingMemoryStore()
        relay = Relay(self.clock, store)
        device = Device(relay)
        device.send(type="create_crew", device_id="leeloo_a", crew_code="LEELOO-ALFA", display_name="A")
        store.fail_with = OSError("disk full")
        # The journal retries once a second: the first retry fails too.
        status, body = call(AdminAPI(relay.operator, TOKEN), "delete-crew", {"crew_code": "LEELOO-ALFA"},
                            clock=self.clock)
        self.assertEqual((status, body["error"]), (503, "store_unavailable"))
        self.assertIn("disk full", body["message"])
