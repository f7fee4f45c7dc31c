"""Learning-rate policies: one small state machine per file."""
