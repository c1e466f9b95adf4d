"""LightningModules and training-loop plumbing: they wire the math and the hooks, they don't contain them."""
