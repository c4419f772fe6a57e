"""Building blocks with parameters or state, above the ops: feature maps, GQA heads, losses, metrics, decode-state layers."""
