"""The latent cache: its format and reader (reader.py), shared by the encode job that writes it and the trainers
that read it."""
