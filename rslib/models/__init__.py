"""Models: the CLIP text side (text.py), and the diffusion models built on diffusers/transformers."""
