"""AdaSEKA (SPEC §5), one folder: the routing math (:mod:`.experts`), the hooks that route in the prefill pass
(:mod:`.hooks`), the method (:mod:`.method`), the learned gate (:mod:`.gate`), the data experts are built from
(:mod:`.sources`) and the routing-statistics LightningModule (:mod:`.selector`)."""
