"""
benchmarks/storm_cpu.py, the in-process storm harness, still drives the
real site: each of its devices gets through the handshake and registers
(it exits with an error otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

HERE = Path(__file__).resolve().parent.parent


class StormCPUTests(SynchronousTestCase):
    def test_every_device_registers(self):
        """
        A small storm runs: every device registers, and the figure is a
        positive time per device for each round.
        """
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))
        out = subprocess.run([sys.executable, str(HERE / "benchmarks" / "storm_cpu.py"), "25", "2"],
                             env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        figures = json.loads(out.stdout)
        self.assertEqual((figures["devices"], len(figures["rounds"])), (25, 2))
        self.assertGreater(figures["us_per_device"], 0)
        self.assertEqual(figures["us_per_device"], min(figures["rounds"]))
