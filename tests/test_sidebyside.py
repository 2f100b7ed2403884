"""
Tests for benchmarks/sidebyside.py: the ratios of a side-by-side run, from
the JSON lines run.sh writes, against the targets.
"""

from __future__ import annotations

import importlib.util
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

HERE = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sidebyside", HERE / "benchmarks" / "sidebyside.py")
sidebyside = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sidebyside)


class RatioTests(SynchronousTestCase):
    def write(self, root: Path, figure: str, side: str, result: dict) -> None:
        path = root / "r1" / f"{figure}-{side}"
        path.mkdir(parents=True)
        (path / "x.json").write_text("log line\n" + json.dumps(result) + "\n")

    def report(self, root: Path) -> str:
        out = io.StringIO()
        with redirect_stdout(out):
            sidebyside.main(root)
        return out.getvalue()

    def test_ratios_and_targets(self):
        """
        Each figure is this relay's over Node's, judged against its target
        in the direction that is better (less memory, more deliveries).
        """
        root = Path(self.mktemp())
        self.write(root, "idle", "node", {"rss_per_device_kib": 6.4})
        self.write(root, "idle", "relay", {"rss_per_device_kib": 4.8})
        self.write(root, "idle", "memory", {"rss_per_device_kib": 4.0})
        self.write(root, "sat2k", "node", {"max_sustained_deliveries_per_s": 16000})
        self.write(root, "sat2k", "relay", {"max_sustained_deliveries_per_s": 12000})
        text = self.report(root)
        self.assertIn("idle memory per device, N=10,000: 0.75  <= 1: met", text)
        self.assertIn("--store memory 4.00 KiB (0.62)", text)
        self.assertIn("N=2,000: 0.75  >= 1.5: NOT met", text)
        self.assertIn("not every target met", text)

    def test_cpu_per_delivery(self):
        """
        The CPU figure is the relay's CPU seconds over the phase per 1,000
        deliveries it made, lower being better, with no target.
        """
        root = Path(self.mktemp())
        self.write(root, "cpu2k", "node", {"received_deliveries": 40000, "whole": {"server_cpu_s": 4.0}})
        self.write(root, "cpu2k", "relay", {"received_deliveries": 40000, "whole": {"server_cpu_s": 6.0}})
        text = self.report(root)
        self.assertIn("CPU per 1,000 deliveries at 4,000 deliveries/s, N=2,000: 1.50  \n", text)
        self.assertIn("Node 100 ms, this relay 150 ms", text)

    def test_failed_run(self):
        """
        A storm in which a device failed has no figure, and misses its
        target.
        """
        root = Path(self.mktemp())
        self.write(root, "storm", "node", {"elapsed_ms": 3000, "registered": 10, "failed": 0, "params": {"n": 10}})
        self.write(root, "storm", "relay", {"elapsed_ms": 2000, "registered": 9, "failed": 1, "params": {"n": 10}})
        text = self.report(root)
        self.assertIn("all registered: failed  <= 1: NOT met", text)
        self.assertIn("Node 3.00 s, this relay failed", text)

    def test_all_met(self):
        root = Path(self.mktemp())
        self.write(root, "storm", "node", {"elapsed_ms": 3000, "registered": 10, "failed": 0, "params": {"n": 10}})
        self.write(root, "storm", "relay", {"elapsed_ms": 2400, "registered": 10, "failed": 0, "params": {"n": 10}})
        text = self.report(root)
        self.assertIn("all registered: 0.80  <= 1: met", text)
        self.assertIn("every target met in every round", text)

    def test_node_sustained_no_step(self):
        """
        When Node's ramp fails at its first step, its figure is below that
        step, and this relay's ratio is a lower bound.
        """
        root = Path(self.mktemp())
        self.write(root, "sat10k", "node", {"max_sustained_deliveries_per_s": None,
                                            "lowest_failing_msgs_per_s": 1000, "params": {"crew_size": 5}})
        self.write(root, "sat10k", "relay", {"max_sustained_deliveries_per_s": 12800})
        text = self.report(root)
        self.assertIn("N=10,000: >3.20  >= 3: met", text)
        self.assertIn("Node sustained no step: p99 over the limit at its first, 4,000 /s", text)

    def test_losses_shown(self):
        """
        A fan-out that lost deliveries still shows its p99, with the loss.
        """
        root = Path(self.mktemp())
        self.write(root, "fanout", "node", {"latency_ms": {"p99": 9397.9}, "lost": 25992})
        self.write(root, "fanout", "relay", {"latency_ms": {"p99": 51.2}, "lost": 0})
        text = self.report(root)
        self.assertIn("N=10,000: 0.01", text)
        self.assertIn("Node 9,398 ms (lost 25,992 deliveries), this relay 51.20 ms", text)

    def test_checkout_side_beside(self):
        """
        The relay on the checkout's own twistd is shown beside, with its
        own ratio; the verdict stays the deployed relay's.
        """
        root = Path(self.mktemp())
        self.write(root, "storm", "node", {"elapsed_ms": 3000, "registered": 10, "failed": 0, "params": {"n": 10}})
        self.write(root, "storm", "relay", {"elapsed_ms": 2700, "registered": 10, "failed": 0, "params": {"n": 10}})
        self.write(root, "storm", "checkout", {"elapsed_ms": 3300, "registered": 10, "failed": 0,
                                               "params": {"n": 10}})
        text = self.report(root)
        self.assertIn("all registered: 0.90  <= 1: met", text)
        self.assertIn("Node 3.00 s, this relay 2.70 s; on the checkout's twistd 3.30 s (1.10)", text)
