"""Ray fleet: per-host actors that own sandboxes, scheduling, experience collection (next stage)."""
