"""Synthesis: from documents and examples to checked, judged training samples (generate, synthesize, qc, judge)."""
