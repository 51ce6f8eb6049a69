"""Helpers of ``scripts/bench.py``: reference, alternatives, timing, report.

The modules are written for the benchmark alone and depend on nothing in
the ``arcface_ce`` package, so that the reference used to accept or refuse
an implementation stays independent of the code under test.
"""
