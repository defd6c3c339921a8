"""The prep stage: readers, validation and cleaning, PII, dedup, splits, contamination, outputs."""
