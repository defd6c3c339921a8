"""The pilot: a short training on the golden set with checks that say go or no-go."""
