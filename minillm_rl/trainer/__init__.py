"""Training loops. Each loop talks to an *engine* with DeepSpeed's surface (``backward``,
``step``), so the single-process path here and the DeepSpeed learners share one code path."""
