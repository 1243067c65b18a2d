"""gnp's Hydra launcher `parallel` (hydra/launcher=parallel): several jobs of a multirun at once, one per device."""
