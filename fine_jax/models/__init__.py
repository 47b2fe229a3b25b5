"""Flax modules: ViT, BERT text/fusion encoder, adapter and the Fashion-FINE model."""
