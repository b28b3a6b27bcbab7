"""Textual inversion: learned pseudo-word embeddings, their training and their file formats."""
