"""
Tests for L{leeloo.figures}: the histogram the relay's parts keep their
latencies in, plain numbers read at scrape time.
"""

from twisted.trial.unittest import SynchronousTestCase

from leeloo.figures import Histogram


class HistogramTests(SynchronousTestCase):
    def test_buckets(self):
        """
        An observation counts in the first bucket whose bound it does not
        exceed (a value equal to a bound counts in it); the cumulative
        buckets end with +Inf, the count of all.
        """
        histogram = Histogram((0.1, 1.0))
        for value in (0.05, 0.1, 0.5, 3.0):
            histogram.observe(value)
        figures = histogram.figures()
        self.assertEqual(figures.counts, (2, 1, 1))
        self.assertEqual(figures.cumulative(), [("0.1", 2), ("1.0", 3), ("+Inf", 4)])
        self.assertEqual((figures.count, figures.sum), (4, 3.65))

    def test_figures_are_a_snapshot(self):
        """
        The figures taken do not move with later observations.
        """
        histogram = Histogram((1.0,))
        figures = histogram.figures()
        histogram.observe(0.5)
        self.assertEqual((figures.counts, figures.count), ((0, 0), 0))
