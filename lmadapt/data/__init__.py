"""Training data: sources of token rows, addressed by (step, rows) so any process can build its share."""
