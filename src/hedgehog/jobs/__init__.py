"""What a command runs end to end: the convert job (and compare), the encoder job, the cheap input checks."""
