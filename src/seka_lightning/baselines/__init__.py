"""Baselines evaluated in the same harness as SEKA (SPEC §6): PASTA, Selective Prompt Anchoring, random projections."""
