"""Every no-grad loop: fidelity to the teacher, long context and passkey, analysis, lm-eval, reports and plots."""
