"""Simulation stage (Phase 4a/4c): the task manifest, scene rendering, stamp injection, the realism
audit, and the physics layer (light profiles, PSF, SIE + shear lensing)."""
