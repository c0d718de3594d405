"""Evaluation: generation under a protocol and Rouge-L / exact match (``protocol``, ``metrics``),
distillation metrics of the student against a teacher (``distill``), bootstrap intervals over
prompts (``stats``), and comparison reports with curves and paired differences (``report``)."""
