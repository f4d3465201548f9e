"""Training draft heads on a frozen base: chat data, self-distillation, hidden-state features, losses."""
