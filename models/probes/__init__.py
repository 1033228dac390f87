"""Pixel probes on a served UNet's decoder features: extraction, training, serving, export."""
