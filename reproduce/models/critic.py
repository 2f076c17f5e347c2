"""WGANCritic: the GAN attack's discriminator (GMI's DGWGAN32; it lives in ``cem_fast.audit.nets``)."""

from cem_fast.audit.nets import WGANCritic

__all__ = ["WGANCritic"]
