"""Evaluation: the paper's CLIP metrics, the toy world's oracle metrics, quality-versus-steps
curves with their plots, and curation of generated samples. See ``ti eval``."""
