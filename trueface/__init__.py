"""TrueFace: detect generated (GAN, diffusion) face photos with a two-stage ResNet-50.

The library is plain PyTorch and never imports Ray: the entry points in ``jobs/`` do.
Labels everywhere: 0 = real photograph, 1 = generated ("fake"); scores are P(fake).
"""

__version__ = "0.1.0"
