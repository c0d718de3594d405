"""Evaluation: generation under a protocol and Rouge-L / exact match (``protocol``, ``metrics``),
and comparison reports with curves (``report``)."""
