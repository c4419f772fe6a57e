"""The from-scratch regime: `model` (every attention kind in a small decoder), `lm` (`hedgehog train`,
`paired-eval`), `mqar` (associative recall)."""
