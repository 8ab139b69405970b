"""Judging: whether the fault's cause is gone, from what the node cannot forge.

`verifier.py` (baseline, verdict with evidence, disruption), `challenge.py` (functional
challenges: requests only the real deployed code answers right), `fixtable.py` (what
counts as a fix per fault type). The ground truth it reads is measured by
`systems/probe.py`."""
