"""ResDecoder: the authors' ``res_normN_AE`` image decoder (it lives in ``cem_fast.audit.nets``).

Used by the decoder model-inversion attack (N=8), as the GAN attack's generator (N=8) and as
the ResSFL/PATROL defender's simulated attacker (N=4).
"""

from cem_fast.audit.nets import ResBlock, ResDecoder

__all__ = ["ResBlock", "ResDecoder"]
