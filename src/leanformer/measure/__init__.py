"""Measure: perplexity / KLD (evaluate), per-layer diagnosis, the HF reference, and bench/ (speed, peers, reports)."""
