"""Reproduction of the CEM paper's experiments (split VGG11 / ResNet-20, defences, attacks)."""
