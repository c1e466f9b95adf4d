"""Data for SEKA: the synthetic QA pairs that projections are learned from, and the benchmark datasets."""
