"""What evaluation and the gate need besides their stages: bits-per-byte scoring, the user's
lm-evaluation-harness tasks, the loss curve's plot."""
