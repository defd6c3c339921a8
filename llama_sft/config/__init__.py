"""Configuration: the preset table, a run's resolved settings, the flags made from them,
hardware."""
