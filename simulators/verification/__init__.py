"""Judging: whether the fault's cause is gone, from what the node cannot forge.

`verifier.py` (baseline, verdict with evidence, disruption), `challenge.py` (the
verifier's own load and requests), `fixtable.py` (what counts as a fix per fault type). The
ground truth it reads is measured by `systems/probe.py`."""
