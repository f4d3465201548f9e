"""Model card templates, installed as `hf_hydra.model_cards` (see pyproject.toml)."""
