"""The attention layer that replaces a model's softmax attention: its modes, the student's prefill/decode paths, the binding to transformers' attention interface, the generation cache."""
