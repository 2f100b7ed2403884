"""
etc/leeloo.service: systemd accepts it, its hardening holds, and the relay
works under it: the C{MemoryDenyWriteExecute=yes} restriction, set here
with C{prctl(PR_SET_MDWE)} as systemd sets it, on the TLS path; and a
socket from C{ListenStream=} through the C{systemd:} endpoint.

systemd itself cannot run here; C{systemd-analyze} (Debian's C{systemd}
package) can, offline.
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate as TwistedCertificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from websockets.sync.client import connect

from .support import CHECKOUT, TIMEOUT, RelayProcess, closing_clients
from .test_tls import DOMAIN, Letsencrypt, handshake, temporary_directory

UNIT = Path(CHECKOUT) / "etc" / "leeloo.service"
ANALYZE = shutil.which("systemd-analyze")
# systemd-analyze security --offline=true's overall exposure for the unit
# (lower is safer); 1.7 before MemoryDenyWriteExecute, RemoveIPC and
# PrivateMounts.
EXPOSURE = 1.5

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
# What systemd does for MemoryDenyWriteExecute=yes on kernels that have it
# (6.3 and later), then proof that it holds, then twistd.
MDWE_PRELUDE = f"""
import ctypes, mmap, sys
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE refused: errno %d" % ctypes.get_errno())
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    print("MDWE: writable executable memory refused", flush=True)
else:
    sys.exit("MDWE let a writable executable mapping through")
"""


def directives(path=UNIT):
    """
    The unit's C{Key=value} lines, by key (a key may repeat).
    """
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


class UnitFileTests(SynchronousTestCase):
    if ANALYZE is None:
        skip = "needs systemd-analyze (Debian's systemd package)"

    def analyze(self, *argv):
        done = subprocess.run([ANALYZE, *argv, str(UNIT)], capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout + done.stderr

    def test_verifies(self):
        """
        systemd-analyze verify's only complaint is the twistd of the
        virtualenv the README installs, absent here.
        """
        code, output = self.analyze("verify")
        complaints = [line for line in output.splitlines() if line.strip()]
        absent = ("leeloo.service: Command /opt/leeloo/venv/bin/twistd is not executable: "
                  "No such file or directory")
        self.assertEqual([line for line in complaints if line != absent], [])
        if not complaints:
            self.assertEqual(code, 0)

    def test_security_exposure(self):
        """
        systemd-analyze security rates the unit's exposure no worse than
        it does today.
        """
        _, output = self.analyze("security", "--offline=true")
        [score] = re.findall(r"Overall exposure level for leeloo\.service: (\d+\.\d+)", output)
        self.assertLessEqual(float(score), EXPOSURE)
        self.assertRegex(output, r"✓ MemoryDenyWriteExecute=")


class DirectiveTests(SynchronousTestCase):
    def test_notify_watchdog_state_directory(self):
        """
        The unit waits for the relay's READY=1, watches it, and gives it
        its state directory, the one ExecStart names.
        """
        found = directives()
        self.assertEqual((found["Type"], found["NotifyAccess"], found["StateDirectory"]),
                         (["notify"], ["main"], ["leeloo"]))
        self.assertGreater(int(found["WatchdogSec"][0]), 0)
        self.assertIn("--data-dir /var/lib/leeloo", UNIT.read_text())
        self.assertEqual(found["MemoryDenyWriteExecute"], ["yes"])
        self.assertGreaterEqual(int(found["LimitNOFILE"][0]), 20000 + 100)


def mdwe_supported():
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0))"
    return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


class MemoryDenyWriteExecuteTests(TestCase):
    """
    The relay under the restriction MemoryDenyWriteExecute=yes sets.
    """

    timeout = 60

    def setUp(self):
        if not mdwe_supported():
            raise SkipTest("this kernel has no PR_SET_MDWE (Linux 6.3 and later)")

    @inlineCallbacks
    def test_tls_path_under_mdwe(self):
        """
        Under PR_SET_MDWE (writable executable memory refused) the relay
        serves TLS with SNI and ALPN, WebSockets over it with the SQLite
        store, /metrics, and stops cleanly: every device gets 1001.
        """
        le = Letsencrypt(self)
        relay = RelayProcess(self, "--listen", le.endpoint_string(), "--admin-listen", "tcp:0:interface=127.0.0.1",
                             cwd=temporary_directory(self), prelude=MDWE_PRELUDE)
        relay.proto.port.addErrback(lambda f: None)
        [port, admin] = yield relay.proto.ready()
        seen = yield deferToThread(handshake, port, DOMAIN, le.ca.root_pem, alpn=["http/1.1"])
        self.assertEqual((seen["fingerprint"], seen["alpn"]), (le.fingerprint(), "http/1.1"))
        self.assertTrue(seen["response"].startswith(b"HTTP/1.1 200 "))
        options = optionsForClientTLS(DOMAIN, trustRoot=TwistedCertificate.loadPEM(le.ca.root_pem))
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        clients = yield closing_clients(3, endpoint.connect, f"wss://{DOMAIN}/ws", crew_size=3)
        body = yield deferToThread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=TIMEOUT).read())
        self.assertIn(b"\nleeloo_devices 3.0\n", body)
        ended = yield relay.stop()
        codes = yield DeferredList([c.closed for c in clients], consumeErrors=True)
        self.assertEqual(Counter(code for _, code in codes), {1001: 3})
        self.assertIn((ended.exitCode, ended.signal), [(0, None), (None, 15)])
        self.assertIn(b"MDWE: writable executable memory refused", relay.proto.output)
        self.assertNotIn(b"Traceback", relay.proto.output)


class SocketActivationTests(TestCase):
    """
    The relay on a socket systemd passes it (LISTEN_FDS), as from a
    C{ListenStream=} socket unit.
    """

    timeout = 60

    @inlineCallbacks
    def test_ipv6_listen_stream(self):
        """
        A ListenStream= socket for a bare port is an IPv6 socket (systemd
        passes it as fd 3 with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID): served
        with --listen systemd:domain=INET6:index=0, a device registers
        through it and the relay sees its real address.
        """
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(("::1", 0))
        sock.listen(64)
        port = sock.getsockname()[1]
        relay = RelayProcess(self, "--listen", "systemd:domain=INET6:index=0", "--store", "memory",
                             environ={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "leeloo.socket"},
                             child_fds={3: sock.fileno()},
                             prelude="import os; os.environ['LISTEN_PID'] = str(os.getpid())")
        relay.proto.port.addErrback(lambda f: None)
        [ready] = yield relay.proto.ready()
        self.assertEqual(ready, port)

        def device():
            with connect(f"ws://[::1]:{port}/ws", open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
                ws.send(json.dumps({"type": "register", "device_id": "leeloo_00000000006a", "crew_code": "V6"}))
                return json.loads(ws.recv(timeout=TIMEOUT))

        reply = yield deferToThread(device)
        self.assertEqual(reply["type"], "registered")
        yield relay.stop()
        self.assertIn(b"register: device leeloo_00000000006a from ::1, crew V6", relay.proto.output)


TEMPLATE = Path(CHECKOUT) / "etc" / "leeloo@.service"
# What the template may set otherwise than leeloo.service: its instance's
# own state, the shared secrets key, and no capability (a port over 1024).
TEMPLATE_OWN = {"Description", "StateDirectory", "WorkingDirectory", "LoadCredential", "ExecReload",
                "AmbientCapabilities", "CapabilityBoundingSet"}


class TemplateUnitTests(SynchronousTestCase):
    """
    etc/leeloo@.service, one node of several on one Redis: systemd accepts
    an instance of it, and it keeps the single unit's hardening.
    """

    def instance(self):
        directory = Path(self.mktemp())
        directory.mkdir()
        unit = directory / "leeloo@8001.service"
        unit.write_text(TEMPLATE.read_text())
        return unit

    def test_verifies_and_exposure(self):
        """
        systemd-analyze verify's only complaint about leeloo@8001.service is
        the absent twistd, and its exposure is no worse than leeloo.service's.
        """
        if ANALYZE is None:
            raise SkipTest("needs systemd-analyze (Debian's systemd package)")
        unit = self.instance()
        done = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        absent = ("leeloo@8001.service: Command /opt/leeloo/venv/bin/twistd is not executable: "
                  "No such file or directory")
        complaints = [line for line in (done.stdout + done.stderr).splitlines() if line.strip() and line != absent]
        self.assertEqual(complaints, [])
        done = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)],
                              capture_output=True, text=True, timeout=60)
        [score] = re.findall(r"Overall exposure level for leeloo@8001\.service: (\d+\.\d+)", done.stdout + done.stderr)
        self.assertLessEqual(float(score), EXPOSURE)

    def test_same_hardening_own_state_shared_key(self):
        """
        Every directive of leeloo.service but the instance's own is the
        template's too, with the same value; each instance has its own
        state directory, and every node reads the one secrets key and
        settings file and the one Redis.
        """
        single, template = directives(), directives(TEMPLATE)
        for key, values in single.items():
            if key not in TEMPLATE_OWN and key != "ExecStart":
                self.assertEqual(template.get(key), values, key)
        self.assertEqual(template["StateDirectory"], ["leeloo/%i"])
        self.assertEqual(sorted(template["LoadCredential"]),
                         ["leeloo.env:/etc/leeloo/leeloo.env", "secrets.key:/etc/leeloo/secrets.key"])
        text = TEMPLATE.read_text()
        for argument in ("--data-dir /var/lib/leeloo/%i", "--secrets-key-file ${CREDENTIALS_DIRECTORY}/secrets.key",
                         "--redis redis://", "--listen tcp:%i", "--trusted-proxy "):
            self.assertIn(argument, text)
