"""Simulation stage (Phase 4a/4c): the task manifest and its draws, simulated or real host stamps, scene rendering,
stamp injection into the Phase 4c table, the realism audit, and the physics layer (light profiles, PSF, SIE +
shear lensing)."""
